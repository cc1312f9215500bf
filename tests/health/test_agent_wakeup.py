"""Detection without polling: the agent blocks until the kernel log changes (inotify on a log
file, /dev/kmsg's own readiness) or the driver reports an XID event (NVML's event wait; the
sim backend's inotify on its state file), so a fault does not wait for the telemetry poll.

The waits below are generous bounds on a blocked call, far shorter than the wait it was
given: a call that only returned when its wait ran out fails them."""

from __future__ import annotations

import os
import select
import threading

import pytest

from aidc.audit.log import AuditLog
from aidc.device import sim
from aidc.device.sim import SimBackend
from aidc.events import Action, FaultKind
from aidc.health.agent import HealthAgent
from aidc.health.kmsg import KernelLogFollower, Position
from aidc.polling import DirectoryWatch
from aidc.store import Store

LONG_WAIT_S = 120.0  # what a blocked call is given
RETURNED_WITHIN_S = 20.0  # what it must take at most when the awaited change happens


def returns_early(call, then) -> object:
    """Start call() on a thread, run then(), and return call()'s result, which must come long
    before the call's own wait runs out."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    then()
    worker.join(RETURNED_WITHIN_S)
    assert not worker.is_alive(), "the blocked call did not return when the change happened"
    return result[0]


def append(path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def readable(fd: int, timeout_s: float) -> bool:
    return bool(select.select([fd], [], [], timeout_s)[0])


# --- the watch on a followed file ------------------------------------------------------------

def test_the_watch_turns_readable_when_a_line_is_written_and_not_before(tmp_path):
    log = tmp_path / "kern.log"
    append(log, "old\n")
    f = KernelLogFollower(log, Position())
    fd = f.watch()
    assert fd is not None and f.read()[0] == ["old"]
    assert not readable(fd, 0), "nothing was written after the read"
    append(log, "NVRM: Xid (PCI:0000:17:00): 13, pid=1\n")
    assert readable(fd, RETURNED_WITHIN_S) and f.woken()
    assert f.read()[0] == ["NVRM: Xid (PCI:0000:17:00): 13, pid=1"]
    f.close()


def test_a_write_to_another_file_in_the_directory_is_not_a_change_of_the_log(tmp_path):
    log = tmp_path / "kern.log"
    log.touch()
    f = KernelLogFollower(log, Position())
    fd = f.watch()
    f.read()
    append(tmp_path / "device.json", "{}")
    assert readable(fd, RETURNED_WITHIN_S), "the directory watch hears its neighbours"
    assert not f.woken(), "but they are not the log"
    f.close()


def test_rotation_under_the_watch_wakes_it_and_both_files_are_read_in_order(tmp_path):
    log = tmp_path / "kern.log"
    append(log, "1\n")
    f = KernelLogFollower(log, Position())
    fd = f.watch()
    assert f.read()[0] == ["1"]
    append(log, "2\n")
    os.rename(log, tmp_path / "kern.log.1")
    append(log, "3\n")
    assert readable(fd, RETURNED_WITHIN_S) and f.woken()
    assert f.read()[0] == ["2", "3"]
    append(log, "4\n")  # the watch is on the directory, so the new file under the name is watched too
    assert readable(fd, RETURNED_WITHIN_S) and f.woken()
    assert f.read()[0] == ["4"]
    f.close()


def test_truncation_under_the_watch_wakes_it_and_the_file_is_read_from_its_start(tmp_path):
    log = tmp_path / "kern.log"
    append(log, "old line 1\nold line 2\n")
    f = KernelLogFollower(log, Position())
    fd = f.watch()
    f.read()
    with open(log, "w") as fh:  # truncated in place (copytruncate), then written
        fh.write("new\n")
    assert readable(fd, RETURNED_WITHIN_S) and f.woken()
    assert f.read()[0] == ["new"]
    f.close()


def test_a_log_that_does_not_exist_yet_is_watched_through_its_directory(tmp_path):
    log = tmp_path / "kern.log"
    f = KernelLogFollower(log, Position())
    fd = f.watch()
    assert fd is not None and f.read()[0] == []
    append(log, "first\n")
    assert readable(fd, RETURNED_WITHIN_S) and f.woken()
    assert f.read()[0] == ["first"]
    f.close()


def test_without_a_directory_there_is_no_watch_and_the_caller_reads_every_interval(tmp_path):
    f = KernelLogFollower(tmp_path / "missing" / "kern.log", Position())
    assert f.watch() is None
    f.close()


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg not readable here")
def test_dev_kmsg_is_its_own_watch_readable_while_records_wait_to_be_read():
    f = KernelLogFollower("/dev/kmsg", Position())
    fd = f.watch()
    assert fd is not None
    assert readable(fd, RETURNED_WITHIN_S), "the kernel's ring buffer is never empty after boot"
    assert f.read()[0], "and what made it readable is read"
    f.close()


def test_a_directory_watch_ends_its_wait_at_a_matching_change_only(tmp_path):
    watch = DirectoryWatch(tmp_path, lambda name: name == "device.json")
    (tmp_path / "other").write_text("x")
    assert not watch.wait(0.05), "another name is not a match"
    assert returns_early(lambda: watch.wait(LONG_WAIT_S), lambda: (tmp_path / "device.json").write_text("{}"))
    watch.close()


# --- the simulated driver's event wait -------------------------------------------------------

def test_the_sim_backend_xid_wait_returns_the_event_when_it_is_injected(sim_node):
    dev = SimBackend(sim_node)
    assert dev.xid_events(1) == []
    events = returns_early(lambda: dev.xid_events(int(LONG_WAIT_S * 1000)),
                           lambda: sim.inject(sim_node, "xid", gpu=1, xid=13, kernel_line=False))
    assert [(e.gpu, e.xid) for e in events] == [(1, 13)]
    assert not (sim_node / "kern.log").read_text(), "the event alone, no kernel line"
    dev.close()


def test_a_state_change_without_an_xid_does_not_end_the_sim_xid_wait(sim_node):
    dev = SimBackend(sim_node)
    dev.xid_events(1)  # the watch starts here
    sim.inject(sim_node, "thermal", gpu=0)
    assert dev.xid_events(50) == []
    dev.close()


# --- the agent -------------------------------------------------------------------------------

@pytest.fixture
def slow_polling_agent(sim_node, tmp_path):
    """An agent whose telemetry poll is far longer than any wait in these tests."""
    a = HealthAgent("node-a", SimBackend(sim_node), sim_node / "kern.log", Store(tmp_path / "store.db"),
                    AuditLog(tmp_path / "audit.db"), poll_interval_s=LONG_WAIT_S * 10)
    halt = threading.Event()
    poller = threading.Thread(target=a.poller, args=(halt,), daemon=True)
    poller.start()
    a.step(0.0)
    yield a
    halt.set()
    poller.join(RETURNED_WITHIN_S)
    a.close()
    a.dev.close()
    a.store.close()
    a.audit.close()


def stored(agent):
    return [(e.kind, e.xid, e.action, e.source) for _, e, _ in agent.store.events("node-a")]


def steps_until_stored(agent):
    """Blocked steps until an event is stored: a wake-up before it may be the startup poll's
    hand-over, so allow a few, each of which must end long before its wait."""
    def run():
        # Bounded: writes beside the log (the simulated device's file shares its directory)
        # wake the directory watch too, each a short step; the whole must still end well within
        # RETURNED_WITHIN_S, which returns_early checks.
        for _ in range(50):
            agent.step(LONG_WAIT_S)
            if stored(agent):
                return stored(agent)
        return stored(agent)
    return run


def test_a_kernel_log_line_ends_the_agents_wait_and_is_stored(slow_polling_agent, sim_node):
    line = "[ 2001.000001] NVRM: Xid (PCI:0000:17:00): 13, pid=2317, name=python, Ch 00000008\n"
    events = returns_early(steps_until_stored(slow_polling_agent), lambda: append(sim_node / "kern.log", line))
    assert events == [(FaultKind.XID, 13, Action.RESTART_APP, "kmsg")]


def test_a_driver_xid_event_ends_the_agents_wait_between_telemetry_polls(slow_polling_agent, sim_node):
    events = returns_early(steps_until_stored(slow_polling_agent),
                           lambda: sim.inject(sim_node, "xid", gpu=0, xid=13, kernel_line=False))
    assert events == [(FaultKind.XID, 13, Action.RESTART_APP, "device")]
