"""The runbook engine's durable run state on every state backend (SQLite and a real PostgreSQL):
runs and their steps, the per-node lock, the step intent, alerts seen, approvals. Reopening is
a restart; the engine's own rules over both backends are in tests/runbook/test_engine.py."""

from __future__ import annotations

import subprocess

import pytest

from aidc.runbook.state import this_owner
from aidc.state import open_run_state


@pytest.fixture
def reopen(state_location):
    backend, location = state_location
    opened = []

    def open_():
        state = open_run_state(backend, location)
        opened.append(state)
        return state

    yield open_
    for state in opened:
        state.close()


def _dead_owner() -> str:
    import socket

    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


def test_a_run_its_steps_and_its_node_lock_survive_a_restart(reopen):
    state = reopen()
    with state.transaction() as db:
        run_id = state.create_run(db, "xid-79", "gpu-1", {"user": "carol"}, [("cordon", "quarantine"), ("tell", "notify")])
        assert state.lock_holder(db, "gpu-1") == run_id
    state.mark_step_running(run_id, 0)  # the intent, before the action
    state.close()

    again = reopen()
    run = again.get_run(run_id)
    assert (run.runbook, run.node, run.status, run.trigger) == ("xid-79", "gpu-1", "running", {"user": "carol"})
    assert [(s.step_id, s.status, s.attempts) for s in again.steps(run_id)] == [("cordon", "running", 1),
                                                                                ("tell", "pending", 0)]
    with again.transaction() as db:
        assert again.lock_holder(db, "gpu-1") == run_id
        assert again.active_run(db, "xid-79", "gpu-1") == run_id
        assert again.running_quarantines(db, exclude_run=-1) == ["gpu-1"]
        assert again.running_quarantines(db, exclude_run=run_id) == []
    again.finish_step(run_id, 0, "failed", {"error": "scheduler refused"})
    again.append_failure_steps(run_id, [("page", "notify")])
    again.append_failure_steps(run_id, [("page", "notify")])  # a resumed run adds them once
    assert [(s.idx, s.phase) for s in again.steps(run_id)] == [(0, "main"), (1, "main"), (2, "on_failure")]
    assert again.steps(run_id)[0].result == {"error": "scheduler refused"}
    again.set_run_status(run_id, "failed", "scheduler refused")
    with again.transaction() as db:
        assert again.lock_holder(db, "gpu-1") is None  # released only when the run finishes
        assert again.last_finished(db, "xid-79", "gpu-1")[0] == run_id
    assert [r.id for r in again.runs(status=("failed",), node="gpu-1")] == [run_id]


def test_a_run_is_claimed_from_a_dead_executor_never_from_a_live_one(reopen):
    state = reopen()
    with state.transaction() as db:
        run_id = state.create_run(db, "rb", "gpu-0", {}, [("s", "notify")])
    assert state.claim(run_id, _dead_owner())
    assert state.claim(run_id)  # the first owner is gone: this process takes over
    assert state.get_run(run_id).owner == this_owner()
    assert not reopen().claim(run_id, _dead_owner())  # the owner now is this process, alive


def test_alerts_are_seen_once_and_approvals_are_kept(reopen):
    state = reopen()
    with state.transaction() as db:
        assert state.alert_seen(db, "fp", "t0") is False
        state.record_alert(db, "fp", "t0", 7)
        state.record_alert(db, "fp", "t0", 8)  # already recorded: the first run id stays
    with state.transaction() as db:
        assert state.alert_seen(db, "fp", "t0") == 7
        state.forget_alert(db, "other", "t0")
    assert reopen().alert_repeats("fp") == 1
    state.approve(3, 1, "carol")
    state.approve(3, 1, "mallory")  # the first approval stands
    assert reopen().approval(3, 1) == "carol" and state.approval(3, 2) is None


def test_a_failed_transaction_leaves_nothing_behind(reopen):
    state = reopen()
    with pytest.raises(RuntimeError), state.transaction() as db:
        state.create_run(db, "rb", "gpu-0", {}, [("s", "notify")])
        raise RuntimeError("crash between the insert and the commit")
    assert state.runs() == []
    with state.transaction() as db:
        assert state.lock_holder(db, "gpu-0") is None


def test_two_engines_claiming_one_run_at_once_leave_it_one_owner(reopen, monkeypatch):
    import os
    import socket
    import threading
    import time

    from aidc.runbook import state as run_state

    first = reopen()
    with first.transaction() as db:
        run_id = first.create_run(db, "rb", "gpu-0", {}, [("s", "notify")])
    assert first.claim(run_id, _dead_owner())  # its executor died: the run is up for taking over
    real_alive = run_state.owner_alive

    def slow_alive(*args):  # widen the window between a claim's read and its write
        time.sleep(0.3)
        return real_alive(*args)

    monkeypatch.setattr(run_state, "owner_alive", slow_alive)
    # Two live executors (this process and its parent), each through its own connection.
    owners = [this_owner(), f"{socket.gethostname()}:{os.getppid()}"]
    handles, won = [first, reopen()], {}
    barrier = threading.Barrier(2)

    def claim(i: int) -> None:
        barrier.wait(10)
        won[owners[i]] = handles[i].claim(run_id, owners[i])

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(won.values()) == [False, True]
    assert first.get_run(run_id).owner == next(o for o, w in won.items() if w)
