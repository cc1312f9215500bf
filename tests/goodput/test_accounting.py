"""ETTR accounting: every second of the allocation goes to exactly one of six parts."""

from __future__ import annotations

import pytest

from aidc.goodput import StepLog, account, read_step_log


def _job_with_one_fault(path) -> None:
    """Allocation at 100; start 101; steps 1-5 (1 s each, 0.1 s sync checkpoint after each)
    from 102; a fault at 108.0 during step 6, detected at 108.5; restart from step 5 at 110;
    steps 6-7 from 111; end at 114."""
    log = StepLog(path, job="j")
    log.allocation(t=100.0)
    log.start(resumed_from=0, world=["a", "b"], t=101.0)
    t = 102.0
    for n in range(1, 6):
        log.step_done(n, t, t + 1.0)
        log.checkpoint(n, t + 1.0, t + 1.1, "sync")
        t += 1.1
    log.fault(t=108.0, node="b", detected_t=108.5)
    log.start(resumed_from=5, world=["a", "c"], t=110.0)
    t = 111.0
    for n in range(6, 8):
        log.step_done(n, t, t + 1.0)
        log.checkpoint(n, t + 1.0, t + 1.1, "sync")
        t += 1.1
    log.end(t=114.0)


def test_wall_time_splits_into_six_parts_that_add_up(tmp_path):
    _job_with_one_fault(tmp_path / "g.jsonl")
    g = account(read_step_log(tmp_path / "g.jsonl"))
    assert g.wall_s == pytest.approx(14.0)
    assert g.seconds == pytest.approx({
        "productive": 7.0,   # seven steps of 1 s, each kept
        "checkpoint": 0.7,   # seven stalls of 0.1 s
        "detection": 0.5,    # fault 108.0 -> detected 108.5
        "restart": 4.5,      # allocation -> first step (2 s) + detected -> first step after restart (2.5 s)
        "lost": 0.5,         # step 6 had run 0.5 s when the fault cut it short
        "idle": 0.8,         # after the last checkpoint until the end
    })
    assert sum(g.seconds.values()) == pytest.approx(g.wall_s)
    assert g.ettr == pytest.approx(0.5)
    assert (g.restarts, g.faults, g.steps_kept, g.steps_redone) == (1, 1, 7, 0)
    assert g.resume_s == pytest.approx([3.0])  # fault -> first step of the new run


def test_steps_redone_after_restoring_an_older_checkpoint_are_lost_work(tmp_path):
    log = StepLog(tmp_path / "g.jsonl", job="j")
    log.allocation(t=0.0)
    log.start(resumed_from=0, t=0.0)
    for n in range(1, 5):  # steps 1-4, only step 2 checkpointed
        log.step_done(n, n - 1.0, float(n))
    log.checkpoint(2, 2.0, 2.0, "sync")
    log.start(resumed_from=2, t=5.0)  # nobody logged the fault: restart from the last record
    for n in (3, 4, 5):
        log.step_done(n, n + 3.0, n + 4.0)
    g = account(read_step_log(tmp_path / "g.jsonl"))
    assert g.steps_redone == 2 and g.steps_kept == 5
    assert g.seconds["lost"] == pytest.approx(2.0)  # the first runs of steps 3 and 4
    assert g.seconds["productive"] == pytest.approx(5.0)
    assert g.seconds["restart"] == pytest.approx(2.0)  # last record 4.0 -> first new step 6.0
    assert g.ettr == pytest.approx(5.0 / 9.0)


def test_without_an_allocation_record_the_wall_starts_at_the_first_record_and_a_window_clips_it(tmp_path):
    log = StepLog(tmp_path / "g.jsonl", job="j")
    log.start(resumed_from=0, t=10.0)
    for n in range(1, 11):
        log.step_done(n, 10.0 + n - 1, 10.0 + n)
    whole = account(read_step_log(tmp_path / "g.jsonl"))
    assert whole.wall_s == pytest.approx(10.0) and whole.ettr == pytest.approx(1.0)
    window = account(read_step_log(tmp_path / "g.jsonl"), since=12.5, until=15.0)
    assert window.wall_s == pytest.approx(2.5) and window.seconds["productive"] == pytest.approx(2.5)


def test_an_asynchronous_checkpoints_background_write_is_not_a_stall(tmp_path):
    log = StepLog(tmp_path / "g.jsonl", job="j")
    log.start(resumed_from=0, t=0.0)
    log.step_done(1, 0.0, 1.0)
    log.checkpoint(1, 1.0, 1.01, "async")
    log.checkpoint_durable(1, write_s=0.5, t=1.51)  # written while step 2 ran
    log.step_done(2, 1.01, 2.01)
    g = account(read_step_log(tmp_path / "g.jsonl"))
    assert g.seconds["checkpoint"] == pytest.approx(0.01)
    assert g.checkpoint_write_s_median == pytest.approx(0.5) and g.checkpoint_mode == "async"
