"""Escalation and the circuit breaker (aidc.failover.remediation), as the failover controller
applies them above every scheduler backend.

Specification: the same fault on the same GPU N times within M minutes moves the action one
rung up restart_app -> reset_gpu -> reboot_node -> contact_support; a node remediated K times
in 7 days goes to a person; each escalation is audited once with the sightings that caused it.
Too many quarantines in the breaker's window latch it open: nothing more is quarantined until a
person resets it; refused events stay pending and are acted on, once, when capacity returns.
"""

from __future__ import annotations

import json

import pytest

from aidc.errors import PolicyRefusal
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.metrics import FailoverMetrics
from aidc.failover.remediation import LADDER, RemediationGate, climb
from aidc.spec import parse_spec
from aidc.state import open_audit_log, open_event_store
from tests.test_failover import RecordingScheduler

T0 = 1_790_000_000.0  # observation times are the agent's clock, given here


def spec(**policy):
    return parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 8, "gpu_model": "SIM",
                                                     "gpus_per_node": 2, "spares": 0}],
                       "policy": {"max_unavailable": 8, "breaker": {"max_quarantines": 100}, **policy}})


def fault(node="gpu-1", xid=8, action=Action.RESTART_APP, gpu=0, at=T0):
    return FaultEvent(node, FaultKind.XID, action, f"XID {xid}", "kmsg", gpu=gpu, xid=xid, observed_at=at)


def _open(tmp_path, backend: str, location: str):
    """The event store and the audit log on one state backend, as a (re)started controller opens them."""
    audit_at = tmp_path / "audit.db" if backend == "sqlite" else location
    return open_event_store(backend, location), open_audit_log(backend, audit_at)


@pytest.fixture
def env(tmp_path, state_location):
    """A store and an audit log on each state backend (tests/conftest.py: state_location)."""
    store, audit = _open(tmp_path, *state_location)
    yield store, audit
    store.close()
    audit.close()


def controller(env, metrics=None, **policy):
    store, audit = env
    sched = RecordingScheduler()
    return FailoverController(spec(**policy), store, audit, sched, metrics=metrics), sched


def decide(ctl, *events):
    for event in events:
        ctl.store.append(event)
    return ctl.run_once()


def test_the_ladder_climbs_one_rung_per_escalation_and_stops_at_a_person():
    assert [climb(Action.RESTART_APP, r) for r in range(5)] == [Action.RESTART_APP, *LADDER[1:], Action.CONTACT_SUPPORT]
    assert climb(Action.IGNORE, 2) == Action.IGNORE                       # not on the ladder
    assert climb(Action.IGNORE, 1, first=Action.CONTACT_SUPPORT) == Action.CONTACT_SUPPORT  # catalog `escalate`
    assert climb(Action.RESET_GPU, 1, first=Action.CONTACT_SUPPORT) == Action.CONTACT_SUPPORT


def test_the_same_fault_on_the_same_gpu_n_times_in_the_window_moves_one_rung_up_audited_with_its_history(env):
    metrics = FailoverMetrics()
    ctl, sched = controller(env, metrics, escalation={"repeats": 3, "window_min": 60})
    decisions = decide(ctl, *(fault(at=T0 + 120 * i) for i in range(3)))
    assert [d.verdict for d in decisions] == ["no_action", "no_action", "quarantine"]
    assert sched.calls == [("quarantine", "gpu-1")] and "reset_gpu (escalated from restart_app" in decisions[2].reason
    [record] = ctl.audit.records(kind="failover.escalation")
    assert (record.payload["from_action"], record.payload["to_action"], record.payload["rule"]) == \
        ("restart_app", "reset_gpu", "repeats")
    assert [h["events"] for h in record.payload["history"]] == [[1], [2], [3]]
    assert 'aidc_failover_escalations_total{from_action="restart_app",to_action="reset_gpu"} 1.0' in metrics.text()


def test_sightings_in_one_burst_on_another_gpu_or_outside_the_window_do_not_escalate(env):
    ctl, sched = controller(env, escalation={"repeats": 2, "window_min": 10, "burst_s": 60})
    decisions = decide(ctl, fault(at=T0), fault(at=T0 + 5), fault(at=T0 + 30),   # one burst
                       fault(gpu=1, at=T0 + 120),                                # another GPU
                       fault(at=T0 + 900))                                       # 15 min later
    assert {d.verdict for d in decisions} == {"no_action"} and sched.calls == []
    assert ctl.audit.records(kind="failover.escalation") == []


def test_catalog_keys_decide_the_first_rung_and_sticky_faults_escalate_on_their_second_sighting(env):
    ctl, sched = controller(env, escalation={"repeats": 3, "window_min": 60, "sticky_repeats": 2})
    # XID 64 (row remap failure): reset_gpu, `escalate: contact_support` skips the reboot.
    decide(ctl, *(fault("gpu-1", 64, Action.RESET_GPU, at=T0 + 120 * i) for i in range(3)))
    # XID 79 (fallen off the bus) is sticky: the second sighting already escalates.
    decide(ctl, *(fault("gpu-2", 79, Action.REBOOT_NODE, at=T0 + 120 * i) for i in range(2)))
    moves = {(r.node, r.payload["from_action"], r.payload["to_action"], r.payload["thresholds"]["sticky"])
             for r in ctl.audit.records(kind="failover.escalation")}
    assert moves == {("gpu-1", "reset_gpu", "contact_support", False),
                     ("gpu-2", "reboot_node", "contact_support", True)}


def test_catalog_repeats_and_window_override_the_policy_for_their_xid(env):
    # XID 31 (GPU memory page fault): `repeats: 2, window_min: 1440` in the catalog, NVIDIA's
    # "repeats on one GPU within 24 h": six in a row are no longer six restart_app.
    ctl, _ = controller(env, escalation={"repeats": 10, "window_min": 1})
    decisions = decide(ctl, fault(xid=31, at=T0), fault(xid=31, at=T0 + 6 * 3600))
    assert [d.verdict for d in decisions] == ["no_action", "quarantine"]


def test_a_node_remediated_k_times_in_7_days_goes_to_a_person(env):
    ctl, sched = controller(env, escalation={"node_remediations": 2, "node_window_days": 7})
    day = 86400
    for i, xid in enumerate((62, 110)):  # distinct faults: only the node's record counts
        [d] = decide(ctl, fault(xid=xid, action=Action.RESET_GPU, at=T0 + i * day))
        assert d.verdict == "quarantine"
        ctl.release("gpu-1", "reset done", "user:op")
    [d] = decide(ctl, fault(xid=120, action=Action.RESET_GPU, at=T0 + 2 * day))
    assert d.verdict == "quarantine" and "asks for contact_support" in d.reason
    [record] = ctl.audit.records(kind="failover.escalation")
    assert record.payload["rule"] == "node_remediations" and len(record.payload["history"]) == 2
    assert [h["ref"] for h in record.payload["history"]] == ["event 1", "event 2"]


def test_a_flapping_node_escalates_rather_than_looping(env):
    """Bad input: fault, release, fault, release, ... climbs the ladder to a person."""
    # Offenders off the count here (tests/test_failover_offenders.py): six XID 62 would mark the
    # GPU a repeat offender, and release would be refused.
    ctl, sched = controller(env, escalation={"repeats": 2, "window_min": 60, "burst_s": 0},
                            offenders={"max_faults": 100})
    actions = []
    for i in range(6):
        [d] = decide(ctl, fault(xid=62, action=Action.RESET_GPU, at=T0 + 300 * i))
        assert d.verdict == "quarantine"
        actions.append(ctl.audit.records(kind="failover.decision")[-1].payload["action"])
        ctl.release("gpu-1", "it looked fine", "user:op")
    assert actions[0] == "reset_gpu" and actions[-1] == "contact_support"
    assert all(LADDER.index(Action(a)) <= LADDER.index(Action(b)) for a, b in zip(actions, actions[1:]))
    assert len(ctl.audit.records(kind="failover.escalation")) == 5


def test_an_escalation_is_decided_and_audited_once_even_when_the_event_is_decided_again(env):
    # The event is refused for capacity, then decided again: the same escalation, one record.
    ctl, sched = controller(env, max_unavailable=1, escalation={"repeats": 2, "burst_s": 0})
    decide(ctl, fault("gpu-0", 62, Action.RESET_GPU))
    decisions = decide(ctl, fault(at=T0), fault(at=T0 + 60))
    assert [d.verdict for d in decisions] == ["no_action", "refused_blast_radius"]
    ctl.release("gpu-0", "fixed", "user:op")
    [again] = ctl.run_once()
    assert again.verdict == "quarantine" and "reset_gpu (escalated" in again.reason
    assert len(ctl.audit.records(kind="failover.escalation")) == 1


# -- the circuit breaker ----------------------------------------------------------------------

def test_more_quarantines_in_the_window_than_policy_latch_the_breaker_open(env):
    metrics = FailoverMetrics()
    ctl, sched = controller(env, metrics, breaker={"max_quarantines": 2, "window_min": 60})
    decisions = decide(ctl, *(fault(f"gpu-{i}", 79, Action.REBOOT_NODE) for i in range(4)))
    assert [d.verdict for d in decisions] == ["quarantine", "quarantine", "refused_breaker_open",
                                              "refused_breaker_open"]
    assert sched.calls == [("quarantine", "gpu-0"), ("quarantine", "gpu-1")]
    [opened] = ctl.audit.records(kind="failover.breaker.open")
    assert opened.node == "gpu-2" and [q["node"] for q in opened.payload["quarantines"]] == ["gpu-0", "gpu-1"]
    assert "aidc_failover_breaker_open 1.0" in metrics.text()
    # Latched: a release frees capacity for the blast radius, not for the breaker.
    ctl.release("gpu-0", "fixed", "user:op")
    assert {d.verdict for d in ctl.run_once()} == {"refused_breaker_open"}
    assert len(sched.calls) == 3 and sched.calls[-1] == ("release", "gpu-0")
    # Refused events are pending, not dropped, and audited once per cause.
    assert [i for i, _ in ctl.store.pending()] == [3, 4]
    assert len([r for r in ctl.audit.records(kind="failover.decision") if r.payload.get("deferred")]) == 2


def test_a_latched_breaker_and_the_escalation_history_survive_a_controller_restart(tmp_path, state_location):
    store, audit = _open(tmp_path, *state_location)
    ctl, _ = controller((store, audit), breaker={"max_quarantines": 1}, escalation={"repeats": 2, "window_min": 10})
    # restart_app twice in the window: one rung up (reset_gpu, a quarantine); the next one latches.
    decide(ctl, fault("gpu-3", 8, gpu=1), fault("gpu-3", 8, gpu=1, at=T0 + 120))
    decide(ctl, fault("gpu-0", 79, Action.REBOOT_NODE))
    assert ctl.gate.breaker()["open"]
    store.close(), audit.close()  # the controller stops (or its pod is replaced)

    store, audit = _open(tmp_path, *state_location)
    try:
        ctl, sched = controller((store, audit), breaker={"max_quarantines": 1},
                                escalation={"repeats": 2, "window_min": 10})
        assert ctl.gate.breaker()["open"]  # still latched: a restart is not a reset
        assert {d.verdict for d in decide(ctl, fault("gpu-2", 79, Action.REBOOT_NODE))} == {"refused_breaker_open"}
        assert sched.calls == []
        assert len(audit.records(kind="failover.escalation")) == 1
        assert audit.verify().ok
    finally:
        store.close(), audit.close()


def test_a_reset_by_a_person_lets_the_refused_events_be_acted_on_once(env):
    ctl, sched = controller(env, breaker={"max_quarantines": 1})
    decide(ctl, fault("gpu-0", 79, Action.REBOOT_NODE), fault("gpu-1", 79, Action.REBOOT_NODE))
    assert ctl.gate.breaker()["open"]
    ctl.gate.reset("user:alice", "a bad driver rollout, rolled back")
    [d] = ctl.run_once(backoff=True)  # the reset moved the capacity counter: decided at once
    assert d.verdict == "quarantine" and d.node == "gpu-1"
    assert ctl.run_once() == [] and sched.calls.count(("quarantine", "gpu-1")) == 1
    [reset] = ctl.audit.records(kind="failover.breaker.reset")
    assert reset.actor == "user:alice" and reset.payload["was"]["open"] is True
    # The reset accepted the quarantines before it; the window counts from there.
    decide(ctl, fault("gpu-2", 79, Action.REBOOT_NODE))
    assert ctl.gate.breaker()["open"]


def test_deferred_events_wait_for_capacity_or_the_recheck_not_every_poll(env):
    ctl, sched = controller(env, max_unavailable=1, deferred_recheck_s=3600)
    decide(ctl, fault("gpu-0", 79, Action.REBOOT_NODE), fault("gpu-1", 79, Action.REBOOT_NODE))
    assert ctl.run_once(backoff=True) == []          # nothing changed: not decided again
    # Capacity returns outside aidc (an operator, no release through aidc)...
    ctl.store.set_node_state("gpu-0", "in_service", "an operator", "user:op")
    assert ctl.run_once(backoff=True) == []          # ...is seen at the periodic re-check
    ctl._recheck_due = 0.0  # the periodic re-check is due
    assert [d.verdict for d in ctl.run_once(backoff=True)] == ["quarantine"]


def test_dry_run_reports_the_breaker_it_would_open_and_latches_nothing(env):
    ctl, sched = controller(env, dry_run=True, breaker={"max_quarantines": 1})
    decisions = decide(ctl, *(fault(f"gpu-{i}", 79, Action.REBOOT_NODE) for i in range(3)))
    assert [d.verdict for d in decisions] == ["would_quarantine", "refused_breaker_open", "refused_breaker_open"]
    assert all(d.dry_run for d in decisions) and sched.calls == [] and ctl.store.pending() == []
    [opened] = ctl.audit.records(kind="failover.breaker.open")
    assert opened.payload["dry_run"] is True and opened.reason.startswith("dry-run: ")
    assert ctl.gate.breaker() == {"open": False}


def test_breaker_policy_takes_a_count_or_a_fraction_of_the_fleet():
    assert spec(breaker={"max_quarantines": "25%"}).policy.breaker.limit(40) == 10
    assert spec(breaker={"max_quarantines": "10%"}).policy.breaker.limit(8) == 2   # at least two
    assert spec(breaker={"max_quarantines": 1}).policy.breaker.limit(8) == 1
    for bad in ("0%", "101%", 0, "two"):
        with pytest.raises(Exception, match="max_quarantines"):
            spec(breaker={"max_quarantines": bad})


def test_reset_needs_the_approver_role_when_roles_are_configured(env):
    store, audit = env
    s = parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 2, "gpu_model": "SIM", "gpus_per_node": 2}],
                    "access": {"roles": {"user:alice": "approver", "user:bob": "operator"}}})
    from aidc.identity import authorize

    with pytest.raises(PolicyRefusal, match="needs role approver"):
        authorize(dict(s.access.roles), ["user:bob"], "approver", "reset the failover circuit breaker", audit)
    assert audit.records(kind="access.refused")[0].actor == "user:bob"
    RemediationGate(s, store, audit).reset("user:alice", "checked")  # an approver may


def test_runbook_and_failover_quarantines_count_in_one_window(env):
    store, audit = env
    gate = RemediationGate(spec(breaker={"max_quarantines": 2}), store, audit)
    with store.transaction():
        gate.record("gpu-5", "quarantine", "runbook", "run 7 step 0")
        gate.record("gpu-5", "quarantine", "runbook", "run 7 step 0")  # a resumed step counts once
    assert gate.admit("gpu-6") is None
    with store.transaction():
        gate.record("gpu-6", "reboot_node", "failover", "event 3")
    assert "circuit breaker opened" in gate.admit("gpu-7") and gate.breaker()["open"]
    assert [q["source"] for q in gate.breaker()["quarantines"]] == ["runbook", "failover"]


def test_the_audit_report_has_a_row_for_each_escalation_and_breaker_change(env, tmp_path):
    from aidc.audit.report import write_report

    ctl, _ = controller(env, breaker={"max_quarantines": 1}, escalation={"sticky_repeats": 2, "burst_s": 0})
    decide(ctl, fault("gpu-0", 79, Action.REBOOT_NODE, at=T0), fault("gpu-1", 79, Action.REBOOT_NODE, at=T0),
           fault("gpu-1", 79, Action.REBOOT_NODE, at=T0 + 60))
    ctl.gate.reset("user:alice", "cooling fixed")
    html_path, json_path, _ = write_report(ctl.audit, tmp_path / "report")
    rows = json.loads(json_path.read_text())["escalations_and_breaker"]
    assert [(r["kind"], r["what"]) for r in rows] == [
        ("failover.breaker.open", "breaker opened: 1 quarantine(s), limit 1"),
        ("failover.escalation", "reboot_node -> contact_support (repeats)"),
        ("failover.breaker.reset", "breaker reset")]
    page = html_path.read_text()
    assert "Escalations and the failover circuit breaker" in page and "reboot_node -&gt; contact_support" in page


@pytest.mark.parametrize("entry, key", [("{action: reset_gpu, repeats: 1}", "xids.62.repeats"),
                                        ("{action: reset_gpu, window_min: 0}", "xids.62.window_min"),
                                        ("{action: reset_gpu, sticky: 'yes'}", "xids.62.sticky"),
                                        ("{action: reset_gpu, escalate: reboot}", "xids.62.escalate")])
def test_a_catalog_with_bad_escalation_keys_does_not_load(tmp_path, entry, key):
    from aidc.errors import SpecError
    from aidc.health.catalog import load_catalog

    path = tmp_path / "catalog.yaml"
    path.write_text(f"version: '1'\nsource: {{name: x}}\nunknown_action: contact_support\nxids:\n  62: {entry}\n")
    with pytest.raises(SpecError) as err:
        load_catalog(path)
    assert err.value.key == key
