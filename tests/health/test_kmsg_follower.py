"""Following a kernel log from a durable position: restarts neither lose nor repeat lines;
partial lines wait; truncation and rotation are survived."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aidc.health.kmsg import KernelLogFollower, Position
from aidc.store import Store


def follower(path, store=None, key="k", max_read=None):
    saved = store.get(key) if store else None
    f = KernelLogFollower(path, Position.from_json(saved))
    if max_read:
        f.MAX_READ = max_read
    return f


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def test_lines_are_returned_once_and_a_partial_line_waits_for_its_newline(tmp_path):
    log = tmp_path / "kern.log"
    append(log, "one\ntw")
    f = follower(log)
    assert f.read()[0] == ["one"]
    assert f.read()[0] == []
    append(log, "o\nthree\n")
    assert f.read()[0] == ["two", "three"]


def test_a_restarted_follower_resumes_from_the_position_saved_in_the_store(tmp_path):
    log, store = tmp_path / "kern.log", Store(tmp_path / "s.db")
    append(log, "a\nb\n")
    first = follower(log, store)
    lines, pos = first.read()
    store.put("k", pos.to_json())
    first.close()
    append(log, "c\n")
    second = follower(log, store)
    assert second.read()[0] == ["c"]
    store.close()


def test_a_file_missing_at_start_is_read_from_its_beginning_once_it_appears(tmp_path):
    log = tmp_path / "kern.log"
    f = follower(log)
    assert f.read()[0] == []
    append(log, "late\n")
    assert f.read()[0] == ["late"]


def test_a_truncated_file_is_read_again_from_the_start(tmp_path):
    log = tmp_path / "kern.log"
    append(log, "old line 1\nold line 2\n")
    f = follower(log)
    f.read()
    log.write_text("new\n")
    assert f.read()[0] == ["new"]


def test_rotation_drains_the_old_file_then_reads_the_new_one(tmp_path):
    log = tmp_path / "kern.log"
    append(log, "1\n")
    f = follower(log)
    assert f.read()[0] == ["1"]
    append(log, "2\n")
    os.rename(log, tmp_path / "kern.log.1")
    append(tmp_path / "kern.log.1", "3\n")  # written by the logger before it reopened
    append(log, "4\n")
    assert f.read()[0] == ["2", "3", "4"]
    append(log, "5\n")
    assert f.read()[0] == ["5"]


SMALL_READ = 64  # bytes per read() in the tests below, so a short file is more than one read


def read_until(f, last: str, max_calls: int = 100) -> list[str]:
    """Lines from repeated read() calls up to and including `last` (bounded)."""
    got: list[str] = []
    for _ in range(max_calls):
        got += f.read()[0]
        if last in got:
            return got
    raise AssertionError(f"{last!r} not read in {max_calls} calls; got {got}")


def test_rotation_drains_all_of_the_old_file_over_several_bounded_reads_before_the_new_one(tmp_path):
    log = tmp_path / "kern.log"
    log.touch()
    f = follower(log, max_read=SMALL_READ)
    assert f.read()[0] == []
    old = [f"old line {i:03d}" for i in range(40)]  # far more than one read's worth
    append(log, "".join(l + "\n" for l in old))
    os.rename(log, tmp_path / "kern.log.1")
    append(log, "new line\n")
    assert f.read()[0] == old[:4], "each read stays bounded"
    assert read_until(f, "new line") == old[4:] + ["new line"]


def test_a_restart_in_the_middle_of_draining_a_rotated_file_neither_loses_nor_repeats_lines(tmp_path):
    log, store = tmp_path / "kern.log", Store(tmp_path / "s.db")
    old = [f"old line {i:03d}" for i in range(40)]
    append(log, "".join(l + "\n" for l in old))
    first = follower(log, store, max_read=SMALL_READ)
    got, pos = first.read()
    store.put("k", pos.to_json())
    first.close()
    # While the agent is down, the file it was reading is rotated and a new one started.
    os.rename(log, tmp_path / "kern.log.1")
    append(log, "new line\n")
    second = follower(log, store, max_read=SMALL_READ)
    lines, pos = second.read()
    got += lines
    store.put("k", pos.to_json())
    second.close()
    third = follower(log, store, max_read=SMALL_READ)  # and once more, while the old file is still being drained
    got += read_until(third, "new line")
    assert got == old + ["new line"]
    store.close()


def test_a_line_longer_than_one_read_does_not_stop_the_follower(tmp_path):
    log = tmp_path / "kern.log"
    log.touch()
    f = follower(log, max_read=SMALL_READ)
    assert f.read()[0] == []
    append(log, "x" * (3 * SMALL_READ) + "\nafter the long line\n")
    os.rename(log, tmp_path / "kern.log.1")
    append(log, "new line\n")
    got = read_until(f, "new line")
    assert got[-2:] == ["after the long line", "new line"]


def test_a_file_rotated_while_the_agent_was_down_is_read_from_its_start(tmp_path):
    log = tmp_path / "kern.log"
    append(log, "a\nb\nc\n")
    f = follower(log)
    _, pos = f.read()
    saved = pos.to_json()
    f.close()
    os.rename(log, tmp_path / "kern.log.1")
    append(log, "x\n")
    assert KernelLogFollower(log, Position.from_json(saved)).read()[0] == ["x"]


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg not readable here")
def test_dev_kmsg_records_are_followed_by_sequence_number_without_repeats():
    first = KernelLogFollower("/dev/kmsg", Position())
    lines, pos = first.read()
    first.close()
    assert lines and pos.kmsg_seq >= 0
    seqs = [int(l.split(",")[1]) for l in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    again = KernelLogFollower("/dev/kmsg", Position.from_json(pos.to_json()))
    more, _ = again.read()
    again.close()
    assert all(int(l.split(",")[1]) > pos.kmsg_seq for l in more)


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg not readable here")
def test_dev_kmsg_position_from_an_earlier_boot_starts_over():
    stale = Position(kmsg_seq=10**12, boot_id="an-earlier-boot")
    f = KernelLogFollower("/dev/kmsg", stale)
    lines, pos = f.read()
    f.close()
    assert lines, "sequence numbers restart at boot: the old position must not hide this boot's records"
    assert pos.boot_id != "an-earlier-boot" and pos.kmsg_seq < 10**12


def test_a_line_is_split_at_line_feeds_only_and_invalid_utf8_is_replaced(tmp_path):
    # str.splitlines() would also split at \x0b, \x1c, \x85, U+2028: a process name or a USB
    # string holding one must not start a new "line" that could read as the driver's.
    log = tmp_path / "kern.log"
    log.write_bytes("[ 1.0] usb 1-1: Product: a\x1c\x0b\u2028\x85b\r\n".encode() + b"[ 1.1] \xff\x00 ok\n")
    assert follower(log).read()[0] == ["[ 1.0] usb 1-1: Product: a\x1c\x0b\u2028\x85b\r", "[ 1.1] \ufffd\x00 ok"]
