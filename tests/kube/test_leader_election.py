"""Leader election on a Lease: one leader at a time, takeover after expiry, a lost lease stops acting."""

from __future__ import annotations

import threading
import time

import pytest

from aidc.failover.leader import LeaseElector, NotLeader


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def elector(apiserver, identity, clock, **kw):
    return LeaseElector(apiserver.client(identity), "aidc-system", "aidc-failover-controller", identity,
                        lease_duration_s=15, renew_deadline_s=10, retry_period_s=2, clock=clock, **kw)


def test_the_first_replica_takes_the_lease_and_the_second_waits(apiserver):
    clock = Clock()
    a, b = elector(apiserver, "a", clock), elector(apiserver, "b", clock)
    assert a.try_acquire_or_renew() and a.is_leader()
    assert not b.try_acquire_or_renew() and not b.is_leader()
    lease = apiserver.leases[("aidc-system", "aidc-failover-controller")]
    assert lease["spec"]["holderIdentity"] == "a" and apiserver.invalid == []


def test_a_dead_leader_is_replaced_only_after_the_lease_duration_on_the_waiters_own_clock(apiserver):
    clock = Clock()
    a, b = elector(apiserver, "a", clock), elector(apiserver, "b", clock)
    a.try_acquire_or_renew()
    b.try_acquire_or_renew()          # b sees a's renewTime now
    clock.now += 14                   # a died (no more renewals); not yet expired for b
    assert not b.try_acquire_or_renew()
    clock.now += 2
    assert b.try_acquire_or_renew() and b.is_leader()
    assert apiserver.leases[("aidc-system", "aidc-failover-controller")]["spec"]["leaseTransitions"] == 1


def test_a_leader_that_cannot_renew_stops_acting_at_its_renew_deadline(apiserver):
    clock = Clock()
    a = elector(apiserver, "a", clock)
    a.try_acquire_or_renew()
    apiserver.fail_next(503, 100)
    clock.now += 5
    assert a.try_acquire_or_renew()   # the renewal failed, but 5 s is within the renew deadline
    assert a.is_leader()
    clock.now += 6                    # 11 s since the last renewal > renew_deadline 10 s
    a.try_acquire_or_renew()
    assert not a.is_leader()
    with pytest.raises(NotLeader):
        a.check()


def test_a_leader_that_finds_another_holder_stops_at_once(apiserver):
    clock = Clock()
    a = elector(apiserver, "a", clock)
    a.try_acquire_or_renew()
    lease = apiserver.leases[("aidc-system", "aidc-failover-controller")]
    lease["spec"]["holderIdentity"] = "someone-else"       # e.g. an operator forced a handover
    assert not a.try_acquire_or_renew() and not a.is_leader()


def test_a_clean_stop_hands_the_lease_over_without_waiting_for_expiry(apiserver):
    clock = Clock()
    a, b = elector(apiserver, "a", clock), elector(apiserver, "b", clock)
    a.try_acquire_or_renew()
    a.release()
    assert not a.is_leader()
    assert b.try_acquire_or_renew()


def test_two_replicas_racing_for_real_are_never_both_leader(apiserver):
    electors = [LeaseElector(apiserver.client(n), "aidc-system", "lease", n, lease_duration_s=2,
                             renew_deadline_s=1.5, retry_period_s=0.05) for n in ("a", "b")]
    stops = []
    for e in electors:
        stops.append(e.start()[1])
    both, leaders = 0, set()
    deadline = time.monotonic() + 3
    killed = False
    while time.monotonic() < deadline:
        states = [e.is_leader() for e in electors]
        both += all(states)
        leaders |= {e.identity for e, s in zip(electors, states) if s}
        if not killed and time.monotonic() > deadline - 2.5 and any(states):
            # Stop the leader's renewals without a release: the other must take over after expiry.
            holder = next(i for i, s in enumerate(states) if s)
            electors[holder].release = lambda: None
            stops[holder].set()
            killed = True
        time.sleep(0.01)
    for s in stops:
        s.set()
    assert both == 0
    assert leaders == {"a", "b"}


# -- a Lease whose content cannot be trusted ages out like a stale one ------------------------------
# Specification: whatever the Lease object holds (no spec, a garbage renewTime or duration, a
# duration of years written by someone else), a waiting replica takes it over after its own
# lease_duration_s of seeing it unchanged; the Lease's own fields never extend that wait.

LEASE = ("aidc-system", "aidc-failover-controller")
UNTRUSTED_LEASES = {
    "a duration of years": lambda lease: lease["spec"].update(leaseDurationSeconds=10**8),
    "a negative duration": lambda lease: lease["spec"].update(leaseDurationSeconds=-5),
    "no renewTime": lambda lease: lease["spec"].pop("renewTime"),
    "a garbage renewTime": lambda lease: lease["spec"].update(renewTime="not a time"),
    "a garbage duration": lambda lease: lease["spec"].update(leaseDurationSeconds="forever"),
    "garbage transitions": lambda lease: lease["spec"].update(leaseTransitions="many"),
    "a holder that is not a string": lambda lease: lease["spec"].update(holderIdentity=["a"]),
    "an empty spec": lambda lease: lease["spec"].clear(),
    "no spec": lambda lease: lease.pop("spec"),
}


@pytest.mark.parametrize("change", UNTRUSTED_LEASES, ids=list(UNTRUSTED_LEASES))
def test_a_lease_whose_content_cannot_be_trusted_is_taken_over_after_the_waiters_own_duration(apiserver, change):
    clock = Clock()
    a, b = elector(apiserver, "a", clock), elector(apiserver, "b", clock)
    assert a.try_acquire_or_renew()   # then a dies, and its Lease is changed under it
    UNTRUSTED_LEASES[change](apiserver.leases[LEASE])
    taken = None
    for second in range(0, 40, 2):    # b polls every retry period
        if b.try_acquire_or_renew():
            taken = second
            break
        clock.now += 2
    assert taken is not None and taken <= 16, change
    assert b.is_leader() and apiserver.leases[LEASE]["spec"]["holderIdentity"] == "b"
    assert apiserver.invalid == []  # what b wrote is a valid Lease, whatever it read
