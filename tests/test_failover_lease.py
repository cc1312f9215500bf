"""The controller lease: one holder at a time; a dead holder is replaced after ttl of silence
as each contender measures it on its own clock; a clean stop hands over at once; a holder that
could not renew, or that was superseded, stops acting."""

from __future__ import annotations

import threading

from aidc.failover.lease import Lease


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_of_two_contenders_only_one_holds(tmp_path):
    clock = Clock()
    a, b = Lease(tmp_path, "a", ttl_s=3, clock=clock), Lease(tmp_path, "b", ttl_s=3, clock=clock)
    assert a.hold() is True and b.hold() is False
    for _ in range(20):  # the holder keeps renewing; the other never gets it
        clock.now += 0.5
        assert a.hold() is True and b.hold() is False and a.held()
    assert a.current()["holder"] == "a"


def test_a_silent_holder_is_replaced_after_ttl_measured_by_the_contender(tmp_path):
    clock = Clock()
    a, b = Lease(tmp_path, "a", ttl_s=3, clock=clock), Lease(tmp_path, "b", ttl_s=3, clock=clock)
    assert a.hold()
    # a is killed: it stops beating. b must watch the beat stay unchanged for ttl_s first.
    assert b.hold() is False
    clock.now += 2.9
    assert b.hold() is False
    clock.now += 0.2
    assert b.hold() is True and b.current()["holder"] == "b" and b.current()["generation"] == 2
    # The old holder, if it was only paused, finds itself superseded and stops acting.
    assert a.held() is False and a.hold() is False


def test_a_contender_that_starts_late_still_waits_a_full_ttl_so_clock_skew_cannot_matter(tmp_path):
    holder_clock, late_clock = Clock(), Clock()
    late_clock.now = 10_000.0  # another host's clock: wildly different
    a = Lease(tmp_path, "a", ttl_s=3, clock=holder_clock)
    b = Lease(tmp_path, "b", ttl_s=3, clock=late_clock)
    assert a.hold()
    for _ in range(10):
        holder_clock.now += 1
        late_clock.now += 1
        assert a.hold() and not b.hold()  # a beats every ttl/3: b sees it change


def test_a_clean_release_hands_over_at_once(tmp_path):
    clock = Clock()
    a, b = Lease(tmp_path, "a", ttl_s=30, clock=clock), Lease(tmp_path, "b", ttl_s=30, clock=clock)
    assert a.hold() and not b.hold()
    a.release()
    assert b.hold() is True and a.held() is False


def test_a_holder_that_could_not_renew_in_time_does_not_act(tmp_path):
    clock = Clock()
    a = Lease(tmp_path, "a", ttl_s=4, clock=clock)
    assert a.hold() and a.held()
    clock.now += 3.5  # paused longer than ttl - margin without renewing
    assert a.held() is False


def test_racing_contenders_for_an_expired_lease_produce_one_winner(tmp_path):
    clock = Clock()
    Lease(tmp_path, "dead", ttl_s=1, clock=clock).hold()
    contenders = [Lease(tmp_path, f"c{i}", ttl_s=1, clock=clock) for i in range(8)]
    for c in contenders:
        c.hold()  # first look: start watching the dead holder's beat
    clock.now += 1.5
    results, start = [], threading.Barrier(len(contenders))

    def race(c):
        start.wait()
        results.append(c.hold())

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results.count(True) == 1
