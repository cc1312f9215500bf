"""Failover: faults become guarded, audited quarantines; a crash neither loses nor repeats one."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from aidc.audit import AuditLog
from aidc.cli.main import app
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.scheduler import LabScheduler
from aidc.installation import record
from aidc.spec import load_stack, parse_spec
from aidc.state import open_event_store
from aidc.store import Store


class RecordingScheduler:
    """Test double of a scheduler backend: records calls, can fail once like a crash."""

    name = "recording"

    def __init__(self, crash_on_quarantine: bool = False):
        self.calls: list[tuple[str, str]] = []
        self.crash = crash_on_quarantine

    def quarantine(self, node, reason, event=None):
        self.calls.append(("quarantine", node))
        if self.crash:
            self.crash = False
            raise SystemExit("controller killed mid-quarantine")

    def release(self, node, reason):
        self.calls.append(("release", node))

    def state(self, node):
        return "quarantined" if ("quarantine", node) in self.calls else "in_service"


def _spec(**policy):
    return parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM",
                                                     "gpus_per_node": 2, "spares": 1}],
                       "policy": {"max_unavailable": 1, **policy}})


def _fault(node="gpu-1", action=Action.REBOOT_NODE, xid=79):
    return FaultEvent(node, FaultKind.XID, action, f"XID {xid}", "kmsg", gpu=0, xid=xid)


@pytest.fixture
def env(tmp_path, state_location):
    """A store on each state backend (tests/conftest.py: state_location) and an audit log."""
    store, audit = open_event_store(*state_location), AuditLog(tmp_path / "audit.db")
    yield tmp_path, store, audit
    store.close()
    audit.close()


def test_a_fatal_xid_quarantines_the_node_once_and_audits_decision_and_action(env):
    _, store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(_spec(), store, audit, sched)
    store.append(_fault())
    store.append(_fault())  # the same fault reported twice (kernel log and NVML)
    verdicts = [d.verdict for d in ctl.run_once()]
    assert verdicts == ["quarantine", "already_quarantined"]
    assert sched.calls == [("quarantine", "gpu-1")]
    assert store.node_state("gpu-1") == "quarantined"
    kinds = [r.kind for r in audit.records(node="gpu-1")]
    # One batch: both decisions are committed first, then the scheduler is called for the intent.
    assert kinds == ["failover.decision", "failover.decision", "failover.action"]
    assert store.pending() == []


def test_a_fault_that_keeps_the_node_in_service_changes_nothing(env):
    _, store, audit = env
    sched = RecordingScheduler()
    store.append(_fault(action=Action.RESTART_APP, xid=13))
    [decision] = FailoverController(_spec(), store, audit, sched).run_once()
    assert decision.verdict == "no_action" and sched.calls == []
    assert store.node_state("gpu-1") == "in_service"


def test_beyond_max_unavailable_it_alerts_and_does_not_quarantine(env):
    _, store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(_spec(), store, audit, sched)
    store.append(_fault("gpu-1"))
    store.append(_fault("gpu-2"))
    assert [d.verdict for d in ctl.run_once()] == ["quarantine", "refused_blast_radius"]
    assert sched.calls == [("quarantine", "gpu-1")]
    assert store.node_state("gpu-2") == "in_service"
    [alert] = audit.records(kind="failover.alert")
    assert alert.node == "gpu-2" and "max_unavailable is 1" in alert.reason


def test_dry_run_records_what_it_would_do_and_does_nothing(env):
    _, store, audit = env
    sched = RecordingScheduler()
    store.append(_fault())
    [decision] = FailoverController(_spec(dry_run=True), store, audit, sched).run_once()
    assert decision.verdict == "would_quarantine" and decision.dry_run
    assert sched.calls == [] and store.node_state("gpu-1") == "in_service"
    assert audit.records(kind="failover.decision")[0].payload["dry_run"] is True


def test_dry_run_decides_what_a_real_run_would_including_repeats_and_the_blast_radius(tmp_path):
    def decide(dry_run: bool):
        store, audit = Store(tmp_path / f"state-{dry_run}.db"), AuditLog(tmp_path / f"audit-{dry_run}.db")
        sched = RecordingScheduler()
        for node in ("gpu-1", "gpu-1", "gpu-2"):  # max_unavailable is 1
            store.append(_fault(node))
        decisions = FailoverController(_spec(dry_run=dry_run), store, audit, sched).run_once()
        alerted = [r.node for r in audit.records(kind="failover.alert")]
        store.close()
        audit.close()
        return [d.verdict for d in decisions], alerted, sched.calls

    assert decide(dry_run=False) == (["quarantine", "already_quarantined", "refused_blast_radius"], ["gpu-2"],
                                     [("quarantine", "gpu-1")])
    assert decide(dry_run=True) == (["would_quarantine", "already_quarantined", "refused_blast_radius"], ["gpu-2"],
                                    [])


def test_a_dry_run_blast_radius_refusal_reads_as_a_refusal_not_as_permission(tmp_path):
    store, audit = Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db")
    for node in ("gpu-1", "gpu-2"):  # max_unavailable is 1: the second would be refused
        store.append(_fault(node))
    decisions = FailoverController(_spec(dry_run=True), store, audit, RecordingScheduler()).run_once()
    assert decisions[1].verdict == "refused_blast_radius"
    assert decisions[1].reason.startswith("dry-run: WOULD BE REFUSED: blast radius")
    assert all(r.dry_run for r in audit.records(kind="failover.decision"))
    store.close()
    audit.close()


def test_a_failing_rendezvous_eviction_leaves_the_quarantine_done_and_audits_the_failure(env):
    tmp_path, store, audit = env
    (tmp_path / "nodes" / "gpu-1").mkdir(parents=True)

    def rendezvous_gone(node):
        raise ConnectionError("rendezvous store unreachable")

    store.append(_fault())
    ctl = FailoverController(_spec(), store, audit, LabScheduler(tmp_path, on_quarantine=rendezvous_gone))
    assert [d.verdict for d in ctl.run_once()] == ["quarantine"]
    assert store.node_state("gpu-1") == "quarantined" and store.pending() == []
    [action] = audit.records(kind="failover.action")
    assert "rendezvous store unreachable" in action.payload["warning"]
    assert "rendezvous store unreachable" in action.reason


def test_a_restart_that_cannot_finish_one_quarantine_audits_it_and_goes_on_to_other_events(env):
    tmp_path, store, audit = env
    (tmp_path / "nodes" / "gpu-2").mkdir(parents=True)
    # A quarantine interrupted by a crash, of a node whose quarantine now fails (any error will
    # do: here its marker's place is taken by a directory). A name the scheduler does not know
    # is no such node: its intent is dropped (test_failover_unknown_nodes.py).
    (tmp_path / "nodes" / "gpu-3" / "quarantined").mkdir(parents=True)
    store.set_node_state("gpu-3", "quarantining", "XID 79", "failover@before-the-crash")
    store.append(_fault("gpu-2"))
    ctl = FailoverController(_spec(max_unavailable=2), store, audit, LabScheduler(tmp_path))
    assert ctl.recover() == []
    [error] = audit.records(kind="failover.error")
    assert error.node == "gpu-3" and "IsADirectoryError" in error.payload["error"]
    assert store.node_state("gpu-3") == "quarantining"  # still counted out of service; an operator decides
    assert [d.verdict for d in ctl.run_once()] == ["quarantine"]
    assert store.node_state("gpu-2") == "quarantined"


@pytest.mark.parametrize("dry_run, killed_at", [(True, "would_quarantine"), (False, "quarantine"),
                                                (False, "failover.action")])
def test_a_controller_killed_while_auditing_writes_the_record_after_restart(env, monkeypatch, dry_run, killed_at):
    _, store, audit = env
    store.append(_fault())
    append = audit.append

    def what(kind, payload):
        return payload.get("verdict") if kind == "failover.decision" else kind

    def killed_while_appending(kind, reason, **kw):
        if what(kind, kw["payload"]) == killed_at:
            monkeypatch.setattr(audit, "append", append)  # the restarted controller lives on
            raise SystemExit("controller killed while auditing")
        return append(kind, reason, **kw)

    monkeypatch.setattr(audit, "append", killed_while_appending)
    with pytest.raises(SystemExit):
        FailoverController(_spec(dry_run=dry_run), store, audit, RecordingScheduler()).run_once()
    restarted = FailoverController(_spec(dry_run=dry_run), store, audit, RecordingScheduler())
    restarted.recover()
    restarted.run_once()
    assert store.pending() == []
    assert killed_at in [what(r.kind, r.payload) for r in audit.records(node="gpu-1")]


def test_a_dry_run_restart_leaves_an_interrupted_quarantine_alone_and_audits_what_it_would_do(env):
    _, store, audit = env
    store.append(_fault())
    with pytest.raises(SystemExit):
        FailoverController(_spec(), store, audit, RecordingScheduler(crash_on_quarantine=True)).run_once()

    sched = RecordingScheduler()
    assert FailoverController(_spec(), store, audit, sched, dry_run=True).recover() == []
    assert sched.calls == [] and store.node_state("gpu-1") == "quarantining"
    [resumed] = [r for r in audit.records(node="gpu-1") if r.payload.get("resumed")]
    assert resumed.kind == "failover.decision" and resumed.payload["dry_run"] is True
    assert "would finish the quarantine" in resumed.reason


def test_a_controller_killed_mid_quarantine_finishes_it_after_restart_without_acting_twice(env):
    _, store, audit = env
    crashing = RecordingScheduler(crash_on_quarantine=True)
    store.append(_fault())
    with pytest.raises(SystemExit):
        FailoverController(_spec(), store, audit, crashing).run_once()
    assert store.node_state("gpu-1") == "quarantining" and len(store.pending()) == 1

    restarted = RecordingScheduler()
    ctl = FailoverController(_spec(), store, audit, restarted)
    assert ctl.recover() == ["gpu-1"]
    # The interrupted event is recorded as the quarantine it was, not decided a second time.
    assert ctl.run_once() == []
    assert [o for _, _, o in store.events()] == ["quarantine"]
    assert restarted.calls == [("quarantine", "gpu-1")]  # finished once, not repeated
    assert store.node_state("gpu-1") == "quarantined"
    assert audit.verify().ok


def test_release_is_an_audited_operator_decision(env):
    _, store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(_spec(), store, audit, sched)
    store.append(_fault())
    ctl.run_once()
    ctl.release("gpu-1", "GPU replaced, burn-in passed", actor="alice")
    assert store.node_state("gpu-1") == "in_service"
    rec = audit.records(kind="failover.release")[0]
    assert rec.actor == "alice" and "GPU replaced" in rec.reason


@pytest.mark.parametrize("flag, released", [((), False), (("--no-dry-run",), True)])
def test_cli_release_follows_the_specs_dry_run_unless_told_otherwise(tmp_path, flag, released):
    stack = yaml.safe_load((Path(__file__).resolve().parents[1] / "Pulumi.lab.yaml").read_text())
    stack["config"]["aidc:cluster"]["policy"]["dry_run"] = True
    (tmp_path / "Pulumi.dry.yaml").write_text(yaml.safe_dump(stack))
    lab = tmp_path / "lab"
    (lab / "nodes" / "gpu-1").mkdir(parents=True)
    LabScheduler(lab).quarantine("gpu-1", "XID 79")
    store = Store(lab / "state.db")
    store.set_node_state("gpu-1", "quarantined", "XID 79", "failover")
    record(lab, load_stack(tmp_path / "Pulumi.dry.yaml"), "dry")  # installed with policy.dry_run

    result = CliRunner().invoke(app, ["failover", "release", "gpu-1", "--reason", "repaired", "--json",
                                      "--stack", str(tmp_path / "Pulumi.dry.yaml"), "--lab-dir", str(lab), *flag])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["released"] is released
    assert store.node_state("gpu-1") == ("in_service" if released else "quarantined")
    store.close()
    assert LabScheduler(lab).state("gpu-1") == ("in_service" if released else "quarantined")


def test_lab_scheduler_stops_the_whole_node_workload(tmp_path):
    node_dir = tmp_path / "nodes" / "gpu-0"
    node_dir.mkdir(parents=True)
    # A "node workload" with a child of its own, in its own process group.
    proc = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    sched = LabScheduler(tmp_path)
    sched.add_process_group("gpu-0", proc.pid)
    assert sched.state("gpu-0") == "in_service"
    sched.quarantine("gpu-0", "test")
    assert proc.wait(timeout=10) != 0
    for _ in range(50):  # the child dies with the group; allow the kernel a moment to reap it
        group_left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout
        if not group_left:
            break
        time.sleep(0.1)
    assert group_left == b""
    assert sched.state("gpu-0") == "quarantined"
    sched.quarantine("gpu-0", "again")  # idempotent
    sched.release("gpu-0", "fixed")
    assert sched.state("gpu-0") == "in_service"


def test_evicting_a_node_makes_the_rendezvous_drop_it_at_the_next_sync():
    """The shortcut failover takes: expire the node's heartbeat in the c10d state."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        RendezvousSettings, RendezvousTimeout, _BackendRendezvousStateHolder, _NodeDesc)

    from aidc.failover.rendezvous import evict
    from aidc.lab.cluster import free_port

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)
    settings = RendezvousSettings("run1", 2, 2, RendezvousTimeout(), timedelta(seconds=1), 3)
    holder = _BackendRendezvousStateHolder(C10dRendezvousBackend(server, "run1"), settings, cache_duration=0)
    holder.sync()
    alive, doomed = _NodeDesc("127.0.0.1", 111, 0), _NodeDesc("127.0.0.1", 222, 0)
    now = datetime.now(timezone.utc)
    holder.state.participants = {alive: 0, doomed: 1}
    holder.state.last_heartbeats = {alive: now, doomed: now}
    holder.state.complete = True
    holder.mark_dirty()
    holder.sync()
    assert set(holder.state.participants) == {alive, doomed}  # both alive by heartbeat

    assert evict("127.0.0.1", port, "run1", pids={222}) == [repr(doomed)]
    holder.sync()
    assert set(holder.state.participants) == {alive}
    assert evict("127.0.0.1", port, "run1", pids={222}) == []  # already gone: nothing to do


def test_cli_on_a_missing_lab_is_a_clear_error_that_creates_nothing(aidc_cli, tmp_path):
    missing = tmp_path / "no-lab"
    out = aidc_cli("failover", "status", "--lab-dir", str(missing))
    assert out.returncode == 1 and "no lab state" in out.stderr and "Traceback" not in out.stderr
    out = aidc_cli("device", "inject", str(missing / "nodes" / "gpu-0"), "xid")
    assert out.returncode == 2 and "no simulated node" in out.stderr
    assert not missing.exists()


# --- the rendezvous trust boundary (issue #13, class 9) ---------------------------------------

class _RunsACommand:
    """A pickle that runs a shell command when loaded with plain pickle.loads."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _store_with_state(run_id: str, state_bits: bytes):
    from base64 import b64encode

    from torch.distributed import TCPStore

    from aidc.failover.rendezvous import state_key
    from aidc.lab.cluster import free_port

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)
    server.set(state_key(run_id), b64encode(state_bits))
    return server, port


def test_a_malicious_pickle_in_the_rendezvous_store_is_refused_and_never_runs(tmp_path):
    import pickle

    from aidc.failover.rendezvous import UntrustedRendezvous, evict, read_state

    marker = tmp_path / "pwned"
    server, port = _store_with_state("run1", pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(UntrustedRendezvous, match="posix.system|os.system"):
        evict("127.0.0.1", port, "run1", pids={222})
    with pytest.raises(UntrustedRendezvous):
        read_state("127.0.0.1", port, "run1")
    assert not marker.exists()
    del server


def test_a_real_rendezvous_state_round_trips_through_the_restricted_unpickler():
    import pickle

    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState

    from aidc.failover.rendezvous import load_state

    state = _RendezvousState()
    a, b = _NodeDesc("127.0.0.1", 111, 0), _NodeDesc("127.0.0.1", 222, 0)
    state.round, state.complete = 3, True
    state.deadline = datetime.now(timezone.utc) + timedelta(seconds=30)
    state.participants, state.wait_list, state.redundancy_list = {a: 0}, {b}, set()
    state.last_heartbeats = {a: datetime.now(timezone.utc), b: datetime.now(timezone.utc)}
    loaded = load_state(pickle.dumps(state))
    assert type(loaded) is _RendezvousState and vars(loaded) == vars(state)


@pytest.mark.parametrize("host, trusted, allowed", [
    ("127.0.0.1", (), True), ("::1", (), True), ("localhost", (), True),
    ("10.4.0.7", (), False), ("10.4.0.7", ("10.4.0.0/16",), True), ("192.168.1.5", ("10.4.0.0/16",), False),
    ("8.8.8.8", (), False)])
def test_eviction_talks_only_to_a_store_on_loopback_or_a_listed_private_network(host, trusted, allowed):
    from aidc.failover.rendezvous import UntrustedRendezvous, check_trusted_host

    if allowed:
        check_trusted_host(host, trusted)
    else:
        with pytest.raises(UntrustedRendezvous, match="not on loopback or a trusted private network"):
            check_trusted_host(host, trusted)


def test_a_public_network_cannot_be_listed_as_trusted():
    from aidc.failover.rendezvous import UntrustedRendezvous, evict

    with pytest.raises(UntrustedRendezvous, match="8.8.8.0/24 is not a private network"):
        evict("8.8.8.8", 29500, "run1", pids={1}, trusted_networks=["8.8.8.0/24"])


def test_the_lab_rendezvous_store_listens_on_loopback_only(tmp_path):
    import sys

    from aidc import polling
    from aidc.lab.cluster import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aidc.lab.rdzv_store", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def listeners():
            out = []
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                for line in Path(table).read_text().splitlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        out.append(local.rsplit(":", 1)[0])
            return out

        found = polling.wait_for("the store to listen", listeners, 60, 0.1, error=AssertionError)
        assert found == ["0100007F"]  # 127.0.0.1, and no wildcard listener
    finally:
        polling.stop_process_group(proc)
