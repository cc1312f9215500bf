"""`aidc failover run` against real Slurm daemons, as processes: killed with SIGKILL between the
drain and its audit record it issues no second drain after a restart, and of two controllers
only the lease holder acts; when the holder is killed the other takes over."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aidc.audit import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.lease import Lease
from aidc.failover.slurm import drain_reason
from aidc.installation import record
from aidc.spec import load_stack
from aidc.store import Store

from .slurm_helpers import drains_issued, reason, write_stack


def _fault(node):
    return FaultEvent(node, FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", gpu=0, xid=79)


def _controller(stack: Path, state: Path, ttl: float = 1.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aidc", "failover", "run", "--stack", str(stack),
                             "--lab-dir", str(state), "--lease-ttl", str(ttl)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait(what, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what.__doc__ or what}")


def test_a_controller_killed_between_the_drain_and_its_record_issues_no_second_drain(local_slurm, tmp_path):
    # Slurm's own tools, except that scontrol SIGKILLs the controller right after the first drain
    # returns: the drain happened in Slurm, and nothing after it in the controller ran.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sinfo", "squeue", "scancel"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    marker = tmp_path / "killed-once"
    (bin_dir / "scontrol").write_text(
        f"#!/bin/bash\n{shutil.which('scontrol')} \"$@\"; rc=$?\n"
        f"case \" $* \" in *' State=DRAIN '*) [ -e {marker} ] || {{ touch {marker}; kill -9 $PPID; }};; esac\n"
        "exit $rc\n")
    (bin_dir / "scontrol").chmod(0o755)
    stack = write_stack(local_slurm, tmp_path, bin_dir=str(bin_dir))
    state = tmp_path / "state"
    store = Store(state / "state.db")
    event = store.append(_fault("gpu-1"))

    first = _controller(stack, state)
    first.wait(60)
    assert first.returncode == -signal.SIGKILL, first.stderr.read()
    audit = AuditLog(state / "audit.db")
    assert reason(local_slurm, "gpu-1") == drain_reason("XID 79 on gpu 0 asks for reboot_node", str(event), "gpu-1")[0]
    assert store.node_state("gpu-1") == "quarantining" and [e for e, _ in store.pending()] == [event]
    assert [r.kind for r in audit.records()] == ["failover.lease", "failover.decision"]

    second = _controller(stack, state)
    try:
        _wait(lambda: not store.pending())
    finally:
        _stop(second)
    assert drains_issued(local_slurm, "gpu-1") == 1
    assert f"(event {event}, mark " in reason(local_slurm, "gpu-1")
    [action] = audit.records(kind="failover.action")
    assert action.payload["resumed"] is True and action.payload["event_id"] == event
    assert "already drained by aidc" in action.reason
    assert [o for _, _, o in store.events()] == ["quarantine"] and store.node_state("gpu-1") == "quarantined"
    assert audit.verify().ok
    store.close()


@pytest.mark.slow
def test_two_controllers_only_the_lease_holder_acts_and_the_other_takes_over_when_it_is_killed(local_slurm, tmp_path):
    stack = write_stack(local_slurm, tmp_path, max_unavailable=2)
    state = tmp_path / "state"
    store = Store(state / "state.db")
    a, b = _controller(stack, state, ttl=2.0), _controller(stack, state, ttl=2.0)
    try:
        lease = Lease(state / "lease")
        holder = _wait(lambda: (lease.current() or {}).get("pid"))
        assert holder in (a.pid, b.pid)
        store.append(_fault("gpu-1"))
        _wait(lambda: not store.pending())
        audit = AuditLog(state / "audit.db")
        actors = {r.actor for r in audit.records() if r.kind in ("failover.decision", "failover.action")}
        assert actors == {f"failover@{os.uname().nodename}:{holder}"}
        time.sleep(1.0)  # both keep running; the other one still does not act
        assert a.poll() is None and b.poll() is None and len(audit.records(kind="failover.lease")) == 1

        os.kill(holder, signal.SIGKILL)
        other = b.pid if holder == a.pid else a.pid
        store.append(_fault("gpu-2"))
        _wait(lambda: not store.pending(), timeout=30)
        assert lease.current()["pid"] == other
        actors = {r.actor for r in audit.records(kind="failover.action")}
        assert actors == {f"failover@{os.uname().nodename}:{holder}", f"failover@{os.uname().nodename}:{other}"}
        assert drains_issued(local_slurm, "gpu-1") == 1 and drains_issued(local_slurm, "gpu-2") == 1
    finally:
        _stop(a), _stop(b)
        store.close()


def test_failover_status_and_release_speak_for_slurm(aidc_cli, local_slurm, tmp_path):
    import json

    from aidc.failover.slurm import SlurmScheduler

    stack = write_stack(local_slurm, tmp_path)
    state = tmp_path / "state"
    Store(state / "state.db").close()
    record(state, load_stack(str(stack)), str(stack))  # installed: release takes its roles from here
    SlurmScheduler(conf=str(local_slurm.conf)).quarantine("gpu-1", "XID 79", event="4")
    local_slurm.run("scontrol", "update", "NodeName=gpu-2", "State=DRAIN", "Reason=cable swap")
    common = ("--stack", str(stack), "--lab-dir", str(state))

    status = json.loads(aidc_cli("failover", "status", *common, "--json", check=True).stdout)
    assert {n: s["why_out"] for n, s in status["scheduler_out_of_service"].items()} == {"gpu-1": "aidc"}

    refused = aidc_cli("failover", "release", "gpu-2", "--reason", "done", *common)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    assert "aidc: error: gpu-2 was drained by root ('cable swap'), not by aidc; aidc never resumes it" in refused.stderr
    out = json.loads(aidc_cli("failover", "release", "gpu-1", "--reason", "fixed", *common, "--json", check=True).stdout)
    assert out == {"node": "gpu-1", "released": True, "decision": "released"}
    assert local_slurm.node_states()["gpu-1"].startswith("idle") and local_slurm.node_states()["gpu-2"] == "drained"
    kinds = [r.kind for r in AuditLog(state / "audit.db").records()]
    assert kinds == ["slurm.release", "failover.release_refused", "slurm.command", "slurm.release", "failover.release"]
