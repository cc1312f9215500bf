"""Repeat offenders and one-GPU quarantine (aidc.failover.offenders, aidc.failover.gpu_quarantine).

Specification: a GPU whose faults weigh policy.offenders.max_faults or more within the window
(catalog weights, one per burst) is marked for repair/RMA with its history; recertification
(`release`) does not return it or its node; only an approver clears it, audited. A fault the
catalog calls local to one GPU takes that GPU out where the backend can (the node stays in
service) and the node otherwise, said in the audit record; the blast radius counts GPUs.
"""

from __future__ import annotations

import json

import pytest

from aidc.audit import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.gpu_quarantine import gpu_state
from aidc.failover.metrics import FailoverMetrics
from aidc.failover.offenders import OffenderError, OffenderRefused, Offenders, offender_state, parse_target
from aidc.failover.scheduler import LabScheduler
from aidc.health.catalog import load_catalog
from aidc.spec import parse_spec
from aidc.state import open_event_store
from tests.test_failover import RecordingScheduler

T0 = 1_790_000_000.0
HOUR = 3600.0


def spec(**policy):
    return parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM",
                                                     "gpus_per_node": 2, "spares": 0}],
                       "policy": {"max_unavailable": 2, "breaker": {"max_quarantines": 100}, **policy}})


def xid(code: int, gpu: int = 1, node: str = "gpu-1", at: float = T0) -> FaultEvent:
    action = load_catalog().classify_xid(code).action
    return FaultEvent(node, FaultKind.XID, action, f"XID {code}", "kmsg", gpu=gpu, xid=code, observed_at=at)


def lab_dir(tmp_path):
    """A lab directory laid out for lab.ranks: gpu (a rank directory per GPU), with no processes:
    quarantine has nothing to stop, the scheduler's markers say what it did."""
    lab = tmp_path / "lab"
    for i in range(4):
        for gpu in range(2):
            (lab / "nodes" / f"gpu-{i}" / "ranks" / f"gpu{gpu}").mkdir(parents=True)
    return lab


@pytest.fixture
def env(tmp_path, state_location):
    store, audit = open_event_store(*state_location), AuditLog(tmp_path / "audit.db")
    yield store, audit
    store.close()
    audit.close()


def run(ctl, *events):
    for event in events:
        with ctl.store.transaction():
            ctl.store.append(event)
    return ctl.run_once()


def test_the_shipped_catalog_decides_scope_and_weight_for_every_entry():
    raw = load_catalog()
    for code, entry in raw.xids.items():
        assert entry["scope"] in ("gpu", "node") and entry["weight"] >= 0, code
    # Local to one GPU: its memory and its reset; beyond it: NVLink, the bus, a reboot.
    assert raw.traits(FaultKind.XID, 48)[0] == raw.traits(FaultKind.XID, 95)[0] == "gpu"
    assert raw.traits(FaultKind.XID, 79)[0] == raw.traits(FaultKind.XID, 74)[0] == "node"
    # A fatal XID counts more than a thermal event.
    assert raw.traits(FaultKind.XID, 48)[1] > raw.traits(FaultKind.THERMAL_THROTTLE, None)[1] > 0
    assert raw.traits(FaultKind.XID, 999) == ("node", 1.0)  # unknown: the node, fail safe


def test_a_catalog_with_a_bad_scope_is_refused_naming_the_key(tmp_path):
    from aidc.errors import SpecError

    bad = tmp_path / "c.yaml"
    bad.write_text("version: '1'\nsource: {name: x}\nunknown_action: contact_support\n"
                   "xids:\n  48: {action: reset_gpu, scope: rack}\n")
    with pytest.raises(SpecError, match="xids.48.scope"):
        load_catalog(bad)


def test_one_gpu_driven_to_repeat_offender_is_not_released_by_recertification(env, tmp_path):
    metrics = FailoverMetrics()
    lab = lab_dir(tmp_path)
    sched = LabScheduler(lab)
    store, audit = env
    ctl = FailoverController(spec(offenders={"max_faults": 4, "window_days": 7}), store, audit, sched,
                             metrics=metrics)
    # XID 48 (double-bit ECC, weight 1.5) on gpu 1, a day apart: 1.5, 3.0, 4.5 >= 4.
    first = run(ctl, xid(48))
    assert [d.verdict for d in first] == ["quarantine_gpu"]
    assert sched.gpu_state("gpu-1", 1) == "quarantined" and sched.state("gpu-1") == "in_service"
    ctl.gpus.release("gpu-1", 1, "reset and re-tested", actor="user:alice")
    assert offender_state(store, "gpu-1", 1) is None
    run(ctl, xid(48, at=T0 + 24 * HOUR))
    ctl.gpus.release("gpu-1", 1, "reset and re-tested", actor="user:alice")
    third = run(ctl, xid(48, at=T0 + 48 * HOUR))
    assert [d.verdict for d in third] == ["quarantine_gpu"]
    mark = offender_state(store, "gpu-1", 1)
    assert mark["target"] == "gpu-1/gpu1" and mark["weight"] == 4.5 and mark["state"] == "repair"
    assert [h["fault"] for h in mark["history"]] == ["xid:48"] * 3
    [record] = audit.records(kind="failover.offender")
    assert record.payload["history"] == mark["history"] and record.node == "gpu-1"
    assert 'aidc_failover_repeat_offender{gpu="1",node="gpu-1"} 1.0' in metrics.text()
    # Recertification refuses the GPU and its node, audited; the GPU stays out.
    with pytest.raises(OffenderRefused, match="repeat offender"):
        ctl.gpus.release("gpu-1", 1, "burn-in passed", actor="user:alice")
    with pytest.raises(OffenderRefused, match="gpu-1/gpu1"):
        ctl.release("gpu-1", "burn-in passed", actor="user:alice")
    assert sched.gpu_state("gpu-1", 1) == "quarantined"
    assert len(audit.records(kind="failover.release_refused")) == 2
    assert offender_state(store, "gpu-1", 0) is None  # the node's other GPU is no offender
    # An approver's clear (audited) lets it back; faults before the clear no longer count.
    Offenders(ctl.spec, store, audit, ctl.gate.catalog, metrics=metrics).clear("gpu-1/1", "user:bob", "GPU replaced")
    [cleared] = audit.records(kind="failover.offender.clear")
    assert cleared.actor == "user:bob" and cleared.payload["was"]["weight"] == 4.5
    ctl.gpus.release("gpu-1", 1, "new GPU burned in", actor="user:alice")
    assert sched.gpu_state("gpu-1", 1) == "in_service"
    run(ctl, xid(48, at=T0 + 72 * HOUR))
    assert offender_state(store, "gpu-1", 1) is None
    assert "aidc_failover_repeat_offender{" not in metrics.text()


def test_a_mild_fault_on_a_marked_offender_still_takes_it_out(env, tmp_path):
    store, audit = env
    ctl = FailoverController(spec(offenders={"max_faults": 1}), store, audit, LabScheduler(lab_dir(tmp_path)))
    [d] = run(ctl, xid(31))  # a page fault: restart_app, weight 0.25
    assert d.verdict == "no_action"
    [d] = run(ctl, xid(64, at=T0 + 5000))  # row-remap failure, weight 3: marked
    assert d.verdict == "quarantine_gpu" and offender_state(store, "gpu-1", 1)["weight"] == 3.25


def test_thermal_events_weigh_less_than_a_fatal_xid(env, tmp_path):
    store, audit = env
    ctl = FailoverController(spec(offenders={"max_faults": 2}), store, audit, RecordingScheduler())
    thermal = [FaultEvent("gpu-2", FaultKind.THERMAL_THROTTLE, Action.IGNORE, "hot", "device", gpu=0,
                          observed_at=T0 + 600 * i) for i in range(4)]
    run(ctl, *thermal)  # 4 x 0.25 = 1
    assert offender_state(store, "gpu-2", 0) is None
    run(ctl, xid(64, gpu=0, node="gpu-2", at=T0 + 9000))
    assert offender_state(store, "gpu-2", 0)["weight"] == 4.0


def test_clearing_what_is_no_offender_or_no_target_is_a_clear_error(env):
    store, audit = env
    offenders = Offenders(spec(), store, audit, load_catalog())
    with pytest.raises(OffenderError, match="not a repeat offender"):
        offenders.clear("gpu-1", "user:bob", "why")
    with pytest.raises(OffenderError, match="NODE or NODE/GPU"):
        parse_target("gpu-1/x/2")
    assert parse_target("gpu-1/gpu3") == parse_target("gpu-1/3") == ("gpu-1", 3)


def test_a_backend_that_cannot_take_one_gpu_out_quarantines_the_node_and_says_so(env):
    store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(spec(), store, audit, sched)
    [d] = run(ctl, xid(48))
    assert d.verdict == "quarantine" and sched.calls == [("quarantine", "gpu-1")]
    [decision] = [r for r in audit.records(kind="failover.decision") if r.payload.get("verdict") == "quarantine"]
    assert decision.payload["scope"] == "node" and "cannot take one GPU out" in decision.payload["gpu_fallback"]


def test_the_gpu_blast_radius_counts_gpus_of_nodes_out_and_gpus_out_alone(env, tmp_path):
    store, audit = env
    sched = LabScheduler(lab_dir(tmp_path))
    ctl = FailoverController(spec(max_unavailable_gpus=3), store, audit, sched)
    assert [d.verdict for d in run(ctl, xid(79, gpu=0, node="gpu-1"))] == ["quarantine"]  # a node: 2 GPUs
    assert [d.verdict for d in run(ctl, xid(48, gpu=1, node="gpu-2"))] == ["quarantine_gpu"]  # 3
    [refused] = run(ctl, xid(48, gpu=0, node="gpu-0"))
    assert refused.verdict == "refused_blast_radius" and "max_unavailable_gpus is 3" in refused.reason
    assert gpu_state(store, "gpu-0", 0) is None and sched.gpu_state("gpu-0", 0) == "in_service"
    # A node whose GPUs would pass the limit is refused too, though max_unavailable (2) allows it.
    *_, node_refused = run(ctl, xid(79, gpu=0, node="gpu-3"))  # after the deferred one, decided again
    assert node_refused.node == "gpu-3" and node_refused.verdict == "refused_blast_radius" and "GPU(s)" in node_refused.reason


def test_a_gpu_quarantine_interrupted_by_a_crash_is_finished_once_after_restart(env, tmp_path):
    store, audit = env
    sched = LabScheduler(lab_dir(tmp_path))
    calls = []

    class Crashing(LabScheduler):
        def quarantine_gpu(self, node, gpu, reason, event=None):
            calls.append((node, gpu))
            if len(calls) == 1:
                raise SystemExit("controller killed mid-quarantine")
            return super().quarantine_gpu(node, gpu, reason, event)

    ctl = FailoverController(spec(), store, audit, Crashing(sched.lab_dir))
    with pytest.raises(SystemExit):
        run(ctl, xid(48))
    assert gpu_state(store, "gpu-1", 1)["state"] == "quarantining"
    again = FailoverController(spec(), store, audit, Crashing(sched.lab_dir))
    assert again.recover() == ["gpu-1/gpu1"]
    assert again.run_once() == [] and calls == [("gpu-1", 1), ("gpu-1", 1)]
    assert gpu_state(store, "gpu-1", 1)["state"] == "quarantined" and sched.gpu_state("gpu-1", 1) == "quarantined"
    assert json.loads(json.dumps(gpu_state(store, "gpu-1", 1)))["event_id"] == 1


def test_offender_list_clear_by_an_approver_and_gpu_release_through_the_cli(tmp_path, aidc_cli):
    """The commands an on-call uses: list, a clear refused to an operator (audited), a clear by
    an approver, a release of NODE/GPU refused while it offends."""
    from aidc.identity import cli_identity
    from aidc.installation import record as install
    from aidc.spec import load_stack
    from aidc.store import Store
    from tests.test_failover_breaker_cli import write_stack

    lab = tmp_path / "lab"
    for gpu in range(2):
        (lab / "nodes" / "gpu-1" / "ranks" / f"gpu{gpu}").mkdir(parents=True)
    args = ("--lab-dir", str(lab))
    for role, name in (("operator", "Pulumi.op.yaml"), ("approver", "Pulumi.ap.yaml")):
        write_stack(tmp_path / name, roles={cli_identity(): role}, offenders={"max_faults": 3})
    operator, approver = str(tmp_path / "Pulumi.op.yaml"), str(tmp_path / "Pulumi.ap.yaml")
    store, audit = Store(lab / "state.db"), AuditLog(lab / "audit.db")
    ctl = FailoverController(load_stack(approver), store, audit, LabScheduler(lab))
    run(ctl, *(xid(64, at=T0 + 3600 * i) for i in range(1)))  # weight 3: marked at once
    store.close()
    audit.close()
    listed = aidc_cli("failover", "offender", "list", "--stack", approver, *args, "--json")
    assert listed.returncode == 0, listed.stderr
    assert list(json.loads(listed.stdout)["offenders"]) == ["gpu-1/gpu1"]
    status = json.loads(aidc_cli("failover", "status", "--stack", approver, *args, "--json").stdout)
    assert status["repeat_offenders"] == ["gpu-1/gpu1"] and status["gpus_out"]["gpu-1/gpu1"]["state"] == "quarantined"
    install(lab, load_stack(approver), approver)
    refused = aidc_cli("failover", "release", "gpu-1/1", "--reason", "burn-in passed", "--stack", approver, *args)
    assert refused.returncode == 1 and "repeat offender" in refused.stderr and "Traceback" not in refused.stderr
    install(lab, load_stack(operator), operator)
    denied = aidc_cli("failover", "offender", "clear", "gpu-1/1", "--reason", "fine", "--stack", operator, *args)
    assert denied.returncode == 3 and "needs role approver" in denied.stderr
    install(lab, load_stack(approver), approver)
    cleared = aidc_cli("failover", "offender", "clear", "gpu-1/gpu1", "--reason", "GPU replaced (RMA 123)",
                       "--stack", approver, *args, "--json")
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout)["cleared"] == "gpu-1/gpu1"
    released = aidc_cli("failover", "release", "gpu-1/1", "--reason", "new GPU burned in", "--stack", approver,
                        *args, "--json")
    assert released.returncode == 0, released.stderr
    assert json.loads(released.stdout)["released"] is True and not (lab / "nodes/gpu-1/quarantined-gpu1").exists()
    audit = AuditLog(lab / "audit.db")
    kinds = [r.kind for r in audit.records() if r.kind.startswith(("failover.offender", "failover.release",
                                                                    "access.refused"))]
    assert kinds == ["failover.offender", "failover.release_refused", "access.refused", "failover.offender.clear",
                     "failover.release"]
    audit.close()


def test_slurm_says_why_a_fault_local_to_one_gpu_drains_the_node():
    from aidc.failover.slurm import SlurmScheduler

    why = SlurmScheduler.gpu_isolation(object.__new__(SlurmScheduler), "gpu-1")
    assert "Slurm cannot take one named GPU out" in why and "which device" in why


def test_releasing_a_gpu_of_a_name_that_is_not_a_node_is_refused_and_audited(env, tmp_path):
    from aidc.nodenames import UnknownNode

    store, audit = env
    ctl = FailoverController(spec(), store, audit, LabScheduler(lab_dir(tmp_path)))
    with pytest.raises(UnknownNode, match="not a node lab knows"):
        ctl.gpus.release("..", 1, "why", actor="user:alice")
    from aidc.nodenames import AUDIT_KIND

    [refused] = audit.records(kind=AUDIT_KIND)
    assert refused.payload["name"] == "'..'" and refused.payload["where"] == "cli"  # shown(), quoted
    assert audit.records(kind="failover.release") == []
