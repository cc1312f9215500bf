"""What the failover controller tells Prometheus so that failover never stalls silently.

Specification: every controller, holding the lease or not, reports `aidc_failover_lease_held`
(1 while it holds the lease and may act) and `aidc_failover_oldest_undecided_event_age_seconds`
(how long the oldest event without a decision has waited, 0 when none waits), so the rules can
alert on "no controller holds the lease" (max over controllers == 0) and on "an event has waited
longer than N s for a decision", also when the reason is that nobody holds the lease. An event
refused for capacity has a decision (it waits for capacity, alerted elsewhere) and does not count.
A lease that cannot be used is audited once per cause, not once per poll.
"""

from __future__ import annotations

import pytest

from aidc.audit import AuditLog
from aidc.failover.controller import FailoverController
from aidc.failover.lease import Lease
from aidc.failover.metrics import FailoverMetrics
from aidc.store import Store
from tests.test_failover import RecordingScheduler, _fault, _spec


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def shared(tmp_path):
    """Two controllers on one store and one lease directory (as the lab runs them)."""
    opened = []

    def controller(name):
        store, audit = Store(tmp_path / "state.db"), AuditLog(tmp_path / f"audit-{name}.db")
        opened.extend((store, audit))
        metrics = FailoverMetrics()
        return FailoverController(_spec(), store, audit, RecordingScheduler(), dry_run=False, actor=name,
                                  metrics=metrics), metrics

    yield controller
    for thing in opened:
        thing.close()


def held(metrics):
    return metrics.registry.get_sample_value("aidc_failover_lease_held")


def waited(metrics):
    return metrics.registry.get_sample_value("aidc_failover_oldest_undecided_event_age_seconds")


def test_each_controller_says_whether_it_holds_the_lease_and_a_takeover_moves_the_one(shared, tmp_path):
    clock = Clock()
    (a, ma), (b, mb) = shared("a"), shared("b")
    la, lb = Lease(tmp_path / "lease", "a", ttl_s=3, clock=clock), Lease(tmp_path / "lease", "b", ttl_s=3, clock=clock)
    assert a.poll(la) is True and b.poll(lb) is False
    assert (held(ma), held(mb)) == (1, 0)
    clock.now += 3.1  # a stops beating (paused); b takes over after ttl on its own clock
    assert b.poll(lb) is True and a.poll(la) is False
    assert (held(ma), held(mb)) == (0, 1)


def test_when_no_controller_can_hold_the_lease_every_one_says_so_and_audits_it_once(shared, tmp_path):
    clock = Clock()
    (tmp_path / "lease").write_text("not a directory")  # an unusable lease path
    (a, ma), (b, mb) = shared("a"), shared("b")
    la, lb = Lease(tmp_path / "lease", "a", ttl_s=3, clock=clock), Lease(tmp_path / "lease", "b", ttl_s=3, clock=clock)
    for _ in range(5):
        assert a.poll(la) is False and b.poll(lb) is False
        clock.now += 1
    assert (held(ma), held(mb)) == (0, 0)
    [record] = a.audit.records(kind="failover.lease_error")
    assert record.payload["dir"] == str(tmp_path / "lease")
    assert record.payload["error"] == f"lease directory {tmp_path / 'lease'} is not a directory"
    assert (tmp_path / "lease").stat().st_mode & 0o777 != 0o700  # an entry that is not the lease's is left alone


def test_the_oldest_undecided_event_is_reported_by_a_controller_that_does_not_hold_the_lease(shared, tmp_path):
    clock = Clock()
    (a, ma), (b, mb) = shared("a"), shared("b")
    la, lb = Lease(tmp_path / "lease", "a", ttl_s=3, clock=clock), Lease(tmp_path / "lease", "b", ttl_s=3, clock=clock)
    assert a.poll(la)  # a holds the lease, then is paused: it decides nothing
    with a.store.transaction():
        a.store.append(_fault("gpu-1"))
    appended_at = b.store.oldest_undecided_at()
    b.wall_clock = lambda: appended_at + 42.0
    assert b.poll(lb) is False
    assert waited(mb) == 42.0 and held(mb) == 0


def test_a_decided_or_deferred_event_is_not_waiting(shared, tmp_path):
    clock = Clock()
    (a, ma), _ = shared("a"), None
    la = Lease(tmp_path / "lease", "a", ttl_s=3, clock=clock)
    with a.store.transaction():
        a.store.append(_fault("gpu-1"))
        a.store.append(_fault("gpu-2"))  # max_unavailable 1: refused for the blast radius, deferred
    first = a.store.oldest_undecided_at()
    a.wall_clock = lambda: first + 600.0
    assert a.poll(la)
    assert [a.store.outcome(i) for i in (1, 2)] == ["quarantine", "refused_blast_radius"]
    assert waited(ma) == 0 and a.store.oldest_undecided_at() is None


def test_without_a_lease_the_controller_acts_and_says_it_holds(shared):
    a, ma = shared("a")
    assert a.poll(None) is True and held(ma) == 1
