"""The Slurm backend against real daemons (fixture `local_slurm`): drains and resumes through
scontrol, owns only the drains it wrote, stops the drained node's job steps, refuses bad input
before Slurm sees it, and survives slurmctld being down and a controller killed mid-quarantine."""

from __future__ import annotations

import pytest

from aidc.audit import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.slurm import MAX_REASON, ReleaseRefused, SlurmError, SlurmScheduler, drain_reason
from aidc.store import Store

from .slurm_helpers import drains_issued, reason, spec_for

NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]


@pytest.fixture
def slurm(local_slurm, tmp_path):
    """(cluster, spec, audit, scheduler) for one test."""
    spec = spec_for(local_slurm, tmp_path)
    audit = AuditLog(tmp_path / "audit.db")
    return local_slurm, spec, audit, SlurmScheduler.from_spec(spec, audit=audit, actor="test")


def _fault(node="gpu-1", xid=79):
    return FaultEvent(node, FaultKind.XID, Action.REBOOT_NODE, f"XID {xid}", "kmsg", gpu=0, xid=xid)


def test_quarantine_drains_with_an_aidc_reason_and_release_resumes_only_that(slurm):
    cluster, _, audit, sched = slurm
    assert sched.quarantine("gpu-1", "XID 79 on gpu 0", event="7") is None
    assert reason(cluster, "gpu-1") == drain_reason("XID 79 on gpu 0", "7", "gpu-1")[0]
    assert cluster.node_states()["gpu-1"] == "drained"
    assert sched.state("gpu-1") == "quarantined" and sched.state("gpu-0") == "in_service"
    assert set(sched.out_of_service()) == {"gpu-1"} and sched.out_of_service()["gpu-1"].aidc_event == "7"

    # Idempotent: a second quarantine issues no second drain and keeps the first event's reason.
    assert "already drained by aidc" in sched.quarantine("gpu-1", "again", event="8")
    assert drains_issued(cluster, "gpu-1") == 1
    assert reason(cluster, "gpu-1") == drain_reason("XID 79 on gpu 0", "7", "gpu-1")[0]

    decision = sched.release("gpu-1", "GPU replaced")
    assert decision.decision == "released"
    assert cluster.node_states()["gpu-1"].startswith("idle")  # idle* for a moment after a resume
    assert sched.release("gpu-1", "again").decision == "not_drained"
    what = [(r.kind, r.payload["argv"][3] if "argv" in r.payload else r.payload["decision"]) for r in audit.records()]
    assert what == [("slurm.command", "State=DRAIN"), ("slurm.command", "State=RESUME"),
                    ("slurm.release", "released"), ("slurm.release", "not_drained")]
    assert audit.verify().ok


def test_an_operators_drain_is_never_overwritten_nor_resumed_and_the_refusal_is_audited(slurm, tmp_path):
    cluster, spec, audit, sched = slurm
    cluster.run("scontrol", "update", "NodeName=gpu-2", "State=DRAIN", "Reason=PSU swap, ticket 4411")
    store = Store(tmp_path / "state.db")
    store.append(_fault("gpu-2"))
    ctl = FailoverController(spec, store, audit, sched, actor="test")
    [decision] = ctl.run_once()
    assert decision.verdict == "quarantine"
    assert reason(cluster, "gpu-2") == "PSU swap, ticket 4411" and drains_issued(cluster, "gpu-2") == 1
    action = next(r for r in audit.records(kind="failover.action"))
    assert "already drained by someone else" in action.reason

    with pytest.raises(ReleaseRefused, match="not by aidc; aidc never resumes it") as refused:
        ctl.release("gpu-2", "fault cleared", actor="alice")
    assert refused.value.decision.decision == "operator_drain"
    assert cluster.node_states()["gpu-2"] == "drained" and reason(cluster, "gpu-2") == "PSU swap, ticket 4411"
    record = next(r for r in audit.records(kind="failover.release_refused"))
    assert record.actor == "alice" and record.payload["decision"]["decision"] == "operator_drain"
    # An operator-drained node is planned work: it is not counted as aidc's blast radius.
    assert sched.out_of_service() == {}
    store.close()


def test_a_downed_node_is_never_resumed_by_aidc(slurm):
    cluster, _, audit, sched = slurm
    cluster.run("scontrol", "update", "NodeName=gpu-3", "State=DOWN", "Reason=aidc: looks like ours but is down")
    with pytest.raises(ReleaseRefused) as refused:
        sched.release("gpu-3", "try")
    assert refused.value.decision.decision == "down"
    assert cluster.node_states()["gpu-3"].startswith("down")
    # Down nodes count towards the blast radius while policy.count_down_nodes (the default) says so.
    assert set(sched.out_of_service()) == {"gpu-3"}
    assert SlurmScheduler(conf=str(cluster.conf), count_down_nodes=False).out_of_service() == {}
    assert [r.payload["decision"] for r in audit.records(kind="slurm.release")] == ["down"]


@pytest.mark.parametrize("node", ["gpu-1; scontrol update NodeName=gpu-0 State=DOWN", "gpu-1\nState=RESUME",
                                  "gpu-[0-3]", "gpu-1 State=DOWN", "$(touch /tmp/aidc-pwned)", "g" * 500])
def test_a_bad_node_name_is_refused_before_slurm_sees_it(slurm, node):
    cluster, _, audit, sched = slurm
    for call in (lambda: sched.quarantine(node, "x"), lambda: sched.release(node, "x"), lambda: sched.state(node)):
        with pytest.raises(SlurmError, match="refusing node name"):
            call()
    assert set(cluster.node_states().values()) == {"idle"}
    assert audit.records() == []


def test_a_hostile_reason_reaches_slurm_as_one_literal_argument_cut_with_a_note(slurm, tmp_path):
    cluster, _, audit, sched = slurm
    marker = tmp_path / "pwned"
    hostile = f"bad GPU\nState=RESUME $(touch {marker}); `touch {marker}` | rm -rf / NodeName=gpu-0 " + "z" * 3000
    note = sched.quarantine("gpu-1", hostile, event="9")
    stored = reason(cluster, "gpu-1")
    # Exactly what aidc meant to write, shell syntax and all, as text: nothing was interpreted.
    assert stored == drain_reason(hostile, "9", "gpu-1")[0]
    assert stored.startswith(f"aidc: bad GPU State=RESUME $(touch {marker}); `touch ")
    assert "... (event 9, mark " in stored and len(stored) == MAX_REASON
    assert "replaced by spaces" in note and "cut to" in note
    assert not marker.exists()
    assert cluster.node_states() == {"gpu-0": "idle", "gpu-1": "drained", "gpu-2": "idle", "gpu-3": "idle",
                                     "gpu-spare-0": "idle"}


def test_quarantine_stops_only_the_drained_nodes_step_and_the_job_runs_on(slurm, tmp_path):
    cluster, _, audit, sched = slurm
    script = tmp_path / "train.sh"
    # One step per node, as elastic training launches it; the job survives losing one.
    script.write_text("#!/bin/bash\nfor n in gpu-0 gpu-1 gpu-2; do srun -N1 -n1 -w $n sleep 300 & done\nwait\n")
    job = cluster.run("sbatch", "--parsable", "-N3", "-w", "gpu-0,gpu-1,gpu-2", "-o", str(tmp_path / "out"),
                      str(script)).stdout.strip()

    def steps() -> dict[str, str]:
        out = cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i %N").stdout
        return dict(line.split() for line in out.splitlines() if not line.split()[0].endswith((".batch", ".extern")))

    import time
    deadline = time.monotonic() + 30
    while len(steps()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(steps().values()) == ["gpu-0", "gpu-1", "gpu-2"]

    assert sched.quarantine("gpu-1", "XID 79", event="3") is None
    deadline = time.monotonic() + 30
    while "gpu-1" in steps().values() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(steps().values()) == ["gpu-0", "gpu-2"]
    assert cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() == "RUNNING"
    cancelled = [r for r in audit.records(kind="slurm.command") if r.payload["argv"][0] == "scancel"]
    assert len(cancelled) == 1 and cancelled[0].payload["argv"][1].startswith(f"{job}.")
    # Quarantining again finds nothing left to stop on the node.
    assert "already drained by aidc" in sched.quarantine("gpu-1", "XID 79", event="3")
    assert len([r for r in audit.records(kind="slurm.command") if r.payload["argv"][0] == "scancel"]) == 1


def test_with_slurmctld_down_the_event_stays_pending_is_audited_once_and_is_retried(slurm, tmp_path):
    cluster, spec, audit, sched = slurm
    store = Store(tmp_path / "state.db")
    event = store.append(_fault("gpu-1"))
    ctl = FailoverController(spec, store, audit, sched, actor="test")
    cluster.stop_daemon("slurmctld")
    for _ in range(2):
        [decision] = ctl.run_once()
        assert decision.verdict == "error" and "slurmctld" in decision.reason
    assert [e for e, _ in store.pending()] == [event]
    errors = audit.records(kind="failover.error")
    assert len(errors) == 1 and "stays pending and is retried" in errors[0].reason

    cluster.start_daemon("slurmctld")
    [decision] = ctl.run_once()
    assert decision.verdict == "quarantine" and store.pending() == []
    assert reason(cluster, "gpu-1") == drain_reason("XID 79 on gpu 0 asks for reboot_node", str(event), "gpu-1")[0]
    assert [r.kind for r in audit.records()][-3:] == ["failover.decision", "slurm.command", "failover.action"]
    assert audit.verify().ok
    store.close()


def test_a_failing_drain_after_the_intent_is_retried_by_the_same_event_not_decided_again(slurm, tmp_path):
    cluster, spec, audit, sched = slurm
    store = Store(tmp_path / "state.db")
    event = store.append(_fault("gpu-1"))
    ctl = FailoverController(spec, store, audit, sched, actor="test")
    real = sched.node

    def ctld_dies_after_the_blast_radius_check(node):
        cluster.stop_daemon("slurmctld")
        return real(node)

    sched.node = ctld_dies_after_the_blast_radius_check
    [decision] = ctl.run_once()
    sched.node = real
    assert decision.verdict == "error" and store.node_state("gpu-1") == "quarantining"
    cluster.start_daemon("slurmctld")
    [decision] = ctl.run_once()
    assert decision.verdict == "quarantine" and store.node_state("gpu-1") == "quarantined"
    assert [r.payload["verdict"] for r in audit.records(kind="failover.decision")] == ["quarantine"]
    assert f"(event {event}, mark " in reason(cluster, "gpu-1") and drains_issued(cluster, "gpu-1") == 1
    store.close()


def test_blast_radius_counts_what_slurm_says_not_the_local_store(slurm, tmp_path):
    cluster, spec, audit, sched = slurm
    # Another controller (another host, an empty local store) drained gpu-0 earlier.
    SlurmScheduler(conf=str(cluster.conf)).quarantine("gpu-0", "XID 48", event="elsewhere-1")
    store = Store(tmp_path / "state.db")
    store.append(_fault("gpu-2"))
    [decision] = FailoverController(spec, store, audit, sched, actor="test").run_once()
    assert decision.verdict == "refused_blast_radius" and "gpu-0" in decision.reason
    assert cluster.node_states()["gpu-2"] == "idle"
    store.close()


@pytest.mark.slow
def test_jobs_that_cannot_lose_one_node_are_requeued_or_reported_never_silently_kept(slurm, tmp_path):
    cluster, _, audit, sched = slurm

    def submit(nodes: str, script: str, *flags: str) -> str:
        path = tmp_path / f"job-{nodes}.sh"
        path.write_text("#!/bin/bash\n" + script + "\n")
        return cluster.run("sbatch", "--parsable", f"-N{nodes.count(',') + 1}", "-w", nodes, *flags,
                           "-o", str(tmp_path / f"{nodes}.out"), str(path)).stdout.strip()

    def running_steps(job: str) -> list[str]:
        out = cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i").stdout.split()
        return [s for s in out if not s.endswith((".batch", ".extern"))]

    # A: one step across two nodes, requeueable. B: the same, not requeueable. C: only a batch script.
    a = submit("gpu-0,gpu-1", "srun -N2 -n2 sleep 300", "--requeue")
    b = submit("gpu-2,gpu-3", "srun -N2 -n2 sleep 300; sleep 300", "--no-requeue")
    c = submit("gpu-spare-0", "sleep 300", "--no-requeue")
    import time
    deadline = time.monotonic() + 30
    while not (running_steps(a) and running_steps(b)) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert sched.quarantine("gpu-1", "XID 79", event="1") is None
    assert sched.quarantine("gpu-3", "XID 79", event="2") is None
    note = sched.quarantine("gpu-spare-0", "XID 79", event="3")
    assert f"{c}: left_running" in note and "not requeueable" in note

    done = [r.payload["argv"] for r in audit.records(kind="slurm.command") if "State=DRAIN" not in r.payload["argv"]]
    assert done == [["scontrol", "requeue", a], ["scancel", f"{b}.0"]]
    fields = cluster.run("scontrol", "show", "job", "-o", a).stdout
    assert "Restarts=1" in fields  # requeued: it restarts from its checkpoints once nodes allow
    deadline = time.monotonic() + 30
    while running_steps(b) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_steps(b) == []
    assert cluster.run("squeue", "-h", "-j", c, "-o", "%T").stdout.strip() == "RUNNING"


def test_on_slurm_a_refused_event_waits_and_is_drained_once_when_aidc_resumes_the_other_node(slurm, tmp_path):
    # The escalation/breaker gate sits above the backend: the same deferral as in the lab.
    cluster, spec, audit, sched = slurm
    store = Store(tmp_path / "state.db")
    ctl = FailoverController(spec, store, audit, sched, actor="test")
    store.append(_fault("gpu-0"))
    store.append(_fault("gpu-2"))
    assert [d.verdict for d in ctl.run_once()] == ["quarantine", "refused_blast_radius"]
    assert cluster.node_states()["gpu-2"] == "idle" and len(store.pending()) == 1
    ctl.release("gpu-0", "GPU reseated", actor="alice")
    [decision] = ctl.run_once(backoff=True)
    assert decision.verdict == "quarantine" and "(event 2, mark " in reason(cluster, "gpu-2")
    assert ctl.run_once() == [] and drains_issued(cluster, "gpu-2") == 1
    store.close()


def test_real_slurms_lines_an_operator_reason_with_a_stamp_and_state_stays_a_drain_not_aidcs(slurm):
    cluster, _, audit, sched = slurm
    hostile = "RMA [bob@2026-01-02T03:04:05] State=IDLE (event 1, mark 000000000000)"
    cluster.run("scontrol", "update", "NodeName=gpu-2", "State=DRAIN", f"Reason={hostile}")
    st = sched.node("gpu-2")
    # Set as the same user aidc runs as here (root): only the mark tells them apart.
    assert (st.base, st.flags, st.reason, st.reason_by, st.why_out) == \
        ("IDLE", frozenset({"DRAIN"}), hostile, sched.user, "operator_drain")
    sched.quarantine("gpu-1", "XID 79", event="4")
    assert (sched.node("gpu-1").why_out, sched.node("gpu-1").aidc_event) == ("aidc", "4")
    assert set(sched.out_of_service()) == {"gpu-1"}
