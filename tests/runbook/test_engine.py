"""The engine's safety rules, specified with fake actuators (no processes, no clocks asserted)."""

from __future__ import annotations

import pytest

from aidc.runbook.catalog import Catalog
from aidc.runbook.engine import Engine
from aidc.spec import Policy
from runbook_fakes import NODES, QUARANTINE_AND_NOTIFY, UNGUARDED_PLAYBOOK, WITH_PLAYBOOK, alert

BROKEN_Q = 'broken{Hostname="gpu-1"}'
# Run state and audit log on each state backend (a real PostgreSQL for the second).
both_backends = pytest.mark.parametrize("run_state_backend", ["sqlite", "postgres"])


def dead_owner() -> str:
    """host:pid of a process that has exited (an executor killed mid-run)."""
    import socket
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


def step_records(engine, kind="runbook.step"):
    return [r for r in engine.audit.records(kind=kind)]


@both_backends
def test_an_alert_runs_its_runbook_and_audits_every_step(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    sub = engine.submit_alert(alert("NodeBroken", "gpu-1", gpu="0"))
    assert sub.outcome == "started"
    run = engine.execute(sub.run_id)
    assert run.status == "done"
    assert [s.status for s in engine.state.steps(run.id)] == ["done", "done", "done"]
    assert fakes.scheduler.calls == [("quarantine", "gpu-1")]
    assert fakes.notifier.messages == [("warning", "gpu-1 is out")]
    recs = step_records(engine)
    assert [r.payload["step"] for r in recs] == ["confirm", "out", "tell"]
    for r in recs:
        assert r.node == "gpu-1" and r.payload["trigger"]["alertname"] == "NodeBroken"
        assert "inputs" in r.payload and "result" in r.payload and r.payload["duration_s"] >= 0
    assert recs[1].payload["inputs"]["reason"] == "broken GPU 0"
    assert [r.payload["step"] for r in step_records(engine, "runbook.step.started")] == ["confirm", "out", "tell"]
    assert engine.audit.verify().ok


def test_repeated_notifications_of_one_alert_start_one_run(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    first = engine.submit_alert(alert("NodeBroken", "gpu-1"))
    engine.execute(first.run_id)
    repeats = [engine.submit_alert(alert("NodeBroken", "gpu-1")) for _ in range(5)]
    assert {r.outcome for r in repeats} == {"duplicate"}
    assert {r.run_id for r in repeats} == {first.run_id}
    assert len(engine.state.runs()) == 1
    assert fakes.scheduler.calls == [("quarantine", "gpu-1")]
    assert engine.state.alert_repeats("fp1") == 5


def test_a_second_alert_for_an_active_run_joins_it(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    first = engine.submit_alert(alert("NodeBroken", "gpu-1", fingerprint="a"))
    second = engine.submit_alert(alert("NodeBroken", "gpu-1", fingerprint="b", gpu="1"))
    assert (second.outcome, second.run_id) == ("duplicate", first.run_id)


def test_a_refired_alert_within_the_cooldown_starts_nothing(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    again = engine.submit_alert(alert("NodeBroken", "gpu-1", starts_at="2026-01-01T01:00:00Z"))
    assert again.outcome == "cooldown"
    assert fakes.scheduler.calls == [("quarantine", "gpu-1")]


@both_backends
def test_one_run_per_node_and_the_lock_survives_a_restart(make_engine, fakes, tmp_path):
    engine = make_engine(QUARANTINE_AND_NOTIFY, WITH_PLAYBOOK)
    first = engine.submit_alert(alert("NeedsFix", "gpu-2", fingerprint="x"))
    assert first.outcome == "started"
    # A new process (same state) sees the lock.
    state, audit = make_engine.reopen()
    restarted = Engine(catalog=Catalog.load(tmp_path / "runbooks"), state=state, audit=audit, actuators=fakes,
                       nodes=list(NODES))
    busy = restarted.submit_alert(alert("NodeBroken", "gpu-2", fingerprint="y"))
    assert (busy.outcome, busy.run_id) == ("node_busy", first.run_id)
    other_node = restarted.submit_alert(alert("NodeBroken", "gpu-3", fingerprint="z"))
    assert other_node.outcome == "started"
    # Not recorded as seen: once the node is free, Alertmanager's next repeat starts it.
    engine.state.set_run_status(first.run_id, "failed", "test")
    assert restarted.submit_alert(alert("NodeBroken", "gpu-2", fingerprint="y")).outcome == "started"


def test_quarantine_beyond_max_unavailable_is_refused_and_handed_over(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY, policy=Policy(max_unavailable=1))
    fakes.scheduler.states["gpu-0"] = "quarantined"
    fakes.metrics.values[BROKEN_Q] = [1.0]
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    assert run.status == "failed" and "blast radius" in run.error
    assert fakes.scheduler.calls == []
    assert fakes.notifier.messages == [("critical", "take-out failed on gpu-1")]


@both_backends
def test_blast_radius_is_checked_again_at_the_quarantine_step(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY, policy=Policy(max_unavailable=1))
    fakes.metrics.values[BROKEN_Q] = [1.0]
    sub = engine.submit_alert(alert("NodeBroken", "gpu-1"))
    # Passes the guard, then another node leaves service before the quarantine step.
    original = fakes.metrics.prometheus

    def meanwhile(query, timeout_s):
        fakes.scheduler.states["gpu-3"] = "quarantined"
        return original(query, timeout_s)

    fakes.metrics.prometheus = meanwhile
    run = engine.execute(sub.run_id)
    assert run.status == "failed"
    out = engine.state.steps(run.id)[1]
    assert (out.step_id, out.status, out.result["refused"]) == ("out", "failed", "blast_radius")
    assert ("quarantine", "gpu-1") not in fakes.scheduler.calls


def test_quarantining_a_node_already_out_does_not_count_against_the_budget(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY, policy=Policy(max_unavailable=1))
    fakes.scheduler.states["gpu-1"] = "quarantined"
    fakes.metrics.values[BROKEN_Q] = [1.0]
    assert engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id).status == "done"


def test_a_destructive_step_without_approval_is_refused(make_engine, fakes):
    engine = make_engine(UNGUARDED_PLAYBOOK)
    run = engine.execute(engine.submit_alert(alert("Reckless", "gpu-0")).run_id)
    assert run.status == "failed" and "needs an approved `approve` step" in run.error
    assert fakes.playbooks.calls == []
    assert fakes.notifier.messages == [("warning", "reckless refused on gpu-0")]


def test_policy_can_allow_a_destructive_kind_without_a_human(make_engine, fakes):
    engine = make_engine(UNGUARDED_PLAYBOOK, policy=Policy(runbook_auto_approve=["quarantine", "playbook"]))
    assert engine.execute(engine.submit_alert(alert("Reckless", "gpu-0")).run_id).status == "done"
    assert fakes.playbooks.calls == [("gpu-reset.yml", "gpu-0", {})]


def test_an_approve_step_pauses_the_run_until_a_human_approves(make_engine, fakes):
    engine = make_engine(WITH_PLAYBOOK)
    sub = engine.submit_alert(alert("NeedsFix", "gpu-0"))
    run = engine.execute(sub.run_id)
    assert run.status == "awaiting_approval"
    assert fakes.scheduler.calls == [("quarantine", "gpu-0")] and fakes.playbooks.calls == []
    # Executing again (the serve scanner does) changes nothing while nobody approved.
    assert engine.execute(sub.run_id).status == "awaiting_approval" and fakes.playbooks.calls == []
    engine.approve(sub.run_id, "alice")
    assert engine.execute(sub.run_id).status == "done"
    assert fakes.playbooks.calls == [("gpu-reset.yml", "gpu-0", {})]
    assert fakes.scheduler.calls == [("quarantine", "gpu-0"), ("release", "gpu-0")]
    approve = [r for r in step_records(engine) if r.payload["step"] == "ok-to-reset"][0]
    assert approve.payload["result"]["approved_by"] == "alice"
    assert engine.audit.records(kind="runbook.approval")[0].payload["approved_by"] == "alice"


def test_an_approve_step_is_skipped_when_policy_allows_everything_it_guards(make_engine, fakes):
    engine = make_engine(WITH_PLAYBOOK, policy=Policy(runbook_auto_approve=["quarantine", "playbook", "release"]))
    assert engine.execute(engine.submit_alert(alert("NeedsFix", "gpu-0")).run_id).status == "done"
    approve = [r for r in step_records(engine) if r.payload["step"] == "ok-to-reset"][0]
    assert approve.payload["result"]["approved_by"] == "policy"


def test_a_failed_playbook_fails_the_run_and_releases_nothing(make_engine, fakes):
    fakes.playbooks.ok = False
    engine = make_engine(WITH_PLAYBOOK)
    sub = engine.submit_alert(alert("NeedsFix", "gpu-0"))
    engine.execute(sub.run_id)
    engine.approve(sub.run_id, "bob")
    run = engine.execute(sub.run_id)
    assert run.status == "failed"
    assert ("release", "gpu-0") not in fakes.scheduler.calls
    assert [s.status for s in engine.state.steps(run.id)] == ["done", "done", "failed", "pending", "done"]
    assert engine.state.lock_holder(engine.state.db, "gpu-0") is None


def test_a_guard_refusal_fails_the_run_before_any_action(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY, policy=Policy(max_unavailable=0))
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    assert run.status == "failed" and run.error.startswith("guard refused")
    assert fakes.scheduler.calls == [] and fakes.metrics.queries == []


def test_a_failed_check_aborts_before_the_quarantine(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [0.0]  # the condition cleared
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    assert run.status == "failed" and fakes.scheduler.calls == []


@both_backends
def test_after_a_crash_a_completed_quarantine_is_reconciled_not_repeated(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    sub = engine.submit_alert(alert("NodeBroken", "gpu-1"))
    # Simulate a process that wrote the intent, quarantined, and died before recording it.
    engine.state.finish_step(sub.run_id, 0, "done", {})
    engine.state.mark_step_running(sub.run_id, 1)
    fakes.scheduler.states["gpu-1"] = "quarantined"
    engine.state.db.execute("UPDATE runs SET owner = ? WHERE id = ?", (dead_owner(), sub.run_id))
    assert sub.run_id in engine.runnable()
    run = engine.execute(sub.run_id)
    assert run.status == "done"
    assert fakes.scheduler.calls == []  # never re-issued
    out = engine.state.steps(run.id)[1]
    assert out.result["reconciled"] is True


@both_backends
def test_after_a_crash_an_interrupted_playbook_is_failed_not_repeated(make_engine, fakes):
    engine = make_engine(WITH_PLAYBOOK)
    sub = engine.submit_alert(alert("NeedsFix", "gpu-0"))
    engine.execute(sub.run_id)
    engine.approve(sub.run_id, "carol")
    engine.state.mark_step_running(sub.run_id, 2)  # the playbook had started when the process died
    run = engine.execute(sub.run_id)
    assert run.status == "failed" and "not repeated" in run.error
    assert fakes.playbooks.calls == []


@both_backends
def test_a_run_owned_by_a_live_process_is_not_taken_over(make_engine, fakes):
    import os
    import socket

    engine = make_engine(QUARANTINE_AND_NOTIFY)
    sub = engine.submit_alert(alert("NodeBroken", "gpu-1"))
    live = f"{socket.gethostname()}:{os.getppid()}"
    assert engine.state.claim(sub.run_id, live)
    assert engine.execute(sub.run_id).status == "pending"
    assert sub.run_id not in engine.runnable()


def test_resolved_unmatched_and_nodeless_alerts_start_nothing(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    assert engine.submit_alert({**alert("NodeBroken", "gpu-1"), "status": "resolved"}).outcome == "resolved"
    assert engine.submit_alert(alert("Unrelated", "gpu-1")).outcome == "unmatched"
    assert engine.submit_alert({"labels": {"alertname": "NodeBroken"}}).outcome == "no_node"
    assert engine.submit_alert(alert("NodeBroken", "not-a-node")).outcome == "unknown_node"
    assert engine.state.runs() == []


def test_a_fault_class_label_selects_the_runbook(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    sub = engine.submit_alert(alert("AidcFault", "gpu-1", kind="fallen_off_bus"))
    assert (sub.outcome, sub.runbook) == ("started", "take-out")


def test_dry_run_describes_every_step_changes_nothing_and_is_audited(make_engine, fakes):
    engine = make_engine(WITH_PLAYBOOK)
    plan = engine.plan("fix-it", "gpu-0")
    assert [p.id for p in plan] == ["out", "ok-to-reset", "reset", "back", "hand-over"]
    assert "take gpu-0 out of service" in plan[0].would and "allowed by policy" in plan[0].gate
    assert plan[1].gate == "needs a human"
    assert "gpu-reset.yml" in plan[2].would and plan[2].gate == "runs after the approval above"
    assert fakes.scheduler.calls == [] and fakes.playbooks.calls == [] and engine.state.runs() == []
    recs = engine.audit.records(kind="runbook.dry_run.step")
    assert len(recs) == 5 and all(r.payload["dry_run"] for r in recs)


def test_dry_run_shows_a_blast_radius_refusal(make_engine, fakes):
    engine = make_engine(WITH_PLAYBOOK, policy=Policy(max_unavailable=1))
    fakes.scheduler.states["gpu-3"] = "quarantined"
    step = engine.plan("fix-it", "gpu-0")[0]
    assert "max_unavailable is 1" in step.refused and "max_unavailable" not in step.gate
    # Said as a refusal, first, in the audit too: never as "would take gpu-0 out of service".
    said = engine.audit.records(kind="runbook.dry_run.step")[0].reason
    assert said.startswith("fix-it/out on gpu-0: WOULD BE REFUSED: blast radius")


def test_dry_run_within_the_blast_radius_reads_as_what_would_happen(make_engine, fakes):
    engine = make_engine(WITH_PLAYBOOK, policy=Policy(max_unavailable=1))
    step = engine.plan("fix-it", "gpu-0")[0]
    assert step.refused == "" and "within max_unavailable" in step.gate
    assert "REFUSED" not in engine.audit.records(kind="runbook.dry_run.step")[0].reason


WITH_BURNIN = """
name: recert
title: Recertify
summary: Burn the node in and release it.
trigger:
  alerts: [{alertname: Recert}]
steps:
  - {id: burn-in, kind: burnin}
  - {id: back, kind: release, reason: "recertified"}
"""


def test_after_a_crash_an_interrupted_burnin_is_failed_and_its_window_closed(make_engine, fakes):
    """A burn-in that was running when the process died is not repeated, and whatever it had opened
    to run the node (Slurm: a reservation the node was resumed into) is closed by the burn-in stage."""
    recovered = []
    fakes.burnin.recover = lambda node: recovered.append(node) or {"closed_reservation": f"aidc-recert-{node}"}
    engine = make_engine(WITH_BURNIN, policy=Policy(runbook_auto_approve=["burnin", "release"]))
    sub = engine.submit_alert(alert("Recert", "gpu-2"))
    engine.state.mark_step_running(sub.run_id, 0)  # the burn-in had started when the process died
    run = engine.execute(sub.run_id)
    assert run.status == "failed" and "not repeated" in run.error
    assert fakes.burnin.calls == [] and recovered == ["gpu-2"]
    result = engine.state.steps(run.id)[0].result
    assert result["recovered"] == {"closed_reservation": "aidc-recert-gpu-2"}
