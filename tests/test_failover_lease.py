"""The controller lease: one holder at a time; a dead holder is replaced after ttl of silence
as each contender measures it on its own clock; a clean stop hands over at once; a holder that
could not renew, or that was superseded, stops acting."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# -- lease state that cannot be read ages out like a stale lease ----------------------------------
# Specification: whatever the lease directory holds (a generation without its beat, an empty or
# garbage beat, a beat that is a directory, a FIFO, a symlink or huge, a generation at or past the
# pattern's last number, stray files), a contender takes the lease over after seeing that state
# for ttl_s and then keeps it: failover never stops for good.

MAX_GEN = 10**18 - 1  # gen-<N>.json holds at most 18 digits


def _write(path, data: bytes):
    path.write_bytes(data)


CORRUPT_STATES = {
    "a generation without its beat": lambda d: _write(d / "gen-1.json", b'{"holder": "x"}'),
    "an empty beat": lambda d: (_write(d / "gen-1.json", b"{}"), _write(d / "gen-1.beat", b"")),
    "a garbage beat": lambda d: (_write(d / "gen-1.json", b"{}"), _write(d / "gen-1.beat", b"\xff{not json")),
    "a beat that is not an object": lambda d: (_write(d / "gen-3.json", b"{}"), _write(d / "gen-3.beat", b"[1, 2]")),
    "a beat that is a directory": lambda d: (_write(d / "gen-2.json", b"{}"), (d / "gen-2.beat").mkdir()),
    "a beat that is a FIFO": lambda d: (_write(d / "gen-2.json", b"{}"), os.mkfifo(d / "gen-2.beat")),
    "a beat that is a symlink": lambda d: (_write(d / "gen-2.json", b"{}"),
                                           os.symlink("/dev/zero", d / "gen-2.beat")),
    "an oversized beat": lambda d: (_write(d / "gen-2.json", b"{}"),
                                    _write(d / "gen-2.beat", b'{"holder": "x", "beat": 1, "pad": "'
                                           + b"x" * (1 << 20) + b'"}')),
    "a generation file that is a directory": lambda d: (d / "gen-4.json").mkdir(),
    "a garbage generation file": lambda d: _write(d / "gen-1.json", os.urandom(64)),
    "the pattern's last generation": lambda d: _write(d / f"gen-{MAX_GEN}.json", b"{}"),
    "the pattern's last generation, a directory": lambda d: (d / f"gen-{MAX_GEN}.json").mkdir(),
    "a generation past the pattern's digits": lambda d: (_write(d / f"gen-{MAX_GEN + 1}.json", b"{}"),
                                                         _write(d / "gen-5.json", b"{}")),
    "stray files": lambda d: (_write(d / "gen-x.json", b""), _write(d / "gen-.json", b""),
                              (d / "gen-7.beat").mkdir(), _write(d / ".gen-1.beat.1.tmp", b"")),
}


@pytest.mark.parametrize("state", CORRUPT_STATES, ids=list(CORRUPT_STATES))
def test_unreadable_lease_state_ages_out_and_the_contender_keeps_the_lease(tmp_path, state):
    CORRUPT_STATES[state](tmp_path)
    clock = Clock()
    b = Lease(tmp_path, "b", ttl_s=3, clock=clock)
    taken_at = None
    for step in range(12):  # polls every ttl/3: at most ttl plus a poll or two
        if b.hold():
            taken_at = step
            break
        clock.now += 1
    assert taken_at is not None and taken_at <= 4, f"{state}: not taken over within ttl"
    for _ in range(10):  # and it keeps the lease (its claim is one every contender can see)
        clock.now += 1
        assert b.hold() and b.held(), state
    c = Lease(tmp_path, "c", ttl_s=3, clock=clock)
    assert c.hold() is False and c.current()["holder"] == "b"


def test_a_garbage_beat_that_keeps_changing_still_ages_out(tmp_path):
    # Only a beat a controller could have written proves a holder alive; changing garbage does not.
    (tmp_path / "gen-1.json").write_text("{}")
    clock = Clock()
    b = Lease(tmp_path, "b", ttl_s=3, clock=clock)
    for i in range(12):
        (tmp_path / "gen-1.beat").write_text(f"garbage {i}")
        if b.hold():
            break
        clock.now += 1
    assert b.held() and i <= 4


def test_lease_directory_and_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        a = Lease(tmp_path / "lease", "a", ttl_s=3, clock=Clock())
        assert a.hold()
        a.release()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "lease").st_mode) == 0o700
    files = sorted(os.listdir(tmp_path / "lease"))
    assert files == ["gen-1.beat", "gen-1.json"]
    assert {f: stat.S_IMODE(os.stat(tmp_path / "lease" / f).st_mode) for f in files} == \
        {f: 0o600 for f in files}


def test_a_lease_directory_others_could_write_is_made_private_again(tmp_path):
    (tmp_path / "lease").mkdir()
    os.chmod(tmp_path / "lease", 0o777)
    assert Lease(tmp_path / "lease", "a", ttl_s=3, clock=Clock()).hold()
    assert stat.S_IMODE(os.stat(tmp_path / "lease").st_mode) == 0o700


_gen_numbers = st.one_of(st.integers(0, 12), st.just(MAX_GEN), st.integers(MAX_GEN - 2, MAX_GEN + 2),
                         st.integers(0, 10**25))
_names = st.one_of(
    st.builds("gen-{}.json".format, _gen_numbers),
    st.builds("gen-{}.beat".format, _gen_numbers),
    st.builds(".gen-{}.beat.{}.tmp".format, _gen_numbers, st.integers(0, 99)),
    st.text(st.sampled_from("gen-.jsobat0123456789x"), min_size=1, max_size=24),
).filter(lambda n: n not in (".", "..") and "/" not in n)
_contents = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda h, b: json.dumps({"holder": h, "beat": b}).encode(), st.text(max_size=8),
              st.one_of(st.integers(-2, 5), st.text(max_size=3), st.none())),
    st.builds(lambda h: json.dumps({"holder": h, "released": False}).encode(), st.text(max_size=8)),
)
_entries = st.dictionaries(_names, st.one_of(_contents, st.just("dir"), st.just("fifo")), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=_entries)
def test_whatever_the_lease_directory_holds_one_of_two_contenders_takes_over_within_ttl(tmp_path_factory, entries):
    d = tmp_path_factory.mktemp("lease")
    for name, content in entries.items():
        if content == "dir":
            (d / name).mkdir()
        elif content == "fifo":
            os.mkfifo(d / name)
        else:
            (d / name).write_bytes(content)
    clock = Clock()
    a, b = Lease(d, "a", ttl_s=3, clock=clock), Lease(d, "b", ttl_s=3, clock=clock)
    holders_per_poll = []
    for _ in range(12):  # 12 polls, one a second: ttl (3 s) plus a poll, then steady state
        holding = [c.holder for c in (a, b) if c.hold()]
        holders_per_poll.append(sorted(c.holder for c in (a, b) if c.held()))
        assert len(holding) <= 1 and len(holders_per_poll[-1]) <= 1, (entries, holders_per_poll)
        clock.now += 1
    # From the fifth poll on (the state seen for ttl_s), exactly one holds, and always the same one.
    later = holders_per_poll[4:]
    assert all(len(h) == 1 for h in later) and len({h[0] for h in later}) == 1, (entries, holders_per_poll)


def test_a_holder_whose_lease_directory_cannot_be_read_does_not_act_and_does_not_crash(tmp_path):
    a = Lease(tmp_path / "lease", "a", ttl_s=3, clock=Clock())
    assert a.hold() and a.held()
    (tmp_path / "lease").rename(tmp_path / "gone")
    (tmp_path / "lease").write_text("a file where the directory was")
    assert a.held() is False
