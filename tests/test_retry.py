"""aidc.retry: the one retry policy. Sleep, clock and random source are injected: these tests read
the waits the policy asks for, never the wall clock."""

from __future__ import annotations

import pytest

from aidc.retry import Backoff, RetryPolicy


class Clock:
    def __init__(self):
        self.now, self.naps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def failing(times: int, exc=ConnectionError("down"), result="ok"):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return result

    return fn, calls


def test_waits_grow_by_the_factor_up_to_the_cap():
    policy = RetryPolicy(base_s=0.5, cap_s=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert RetryPolicy(base_s=1, cap_s=30).delay(10_000) == 30  # no overflow after a long outage


def test_full_jitter_draws_between_zero_and_the_capped_wait():
    policy = RetryPolicy(base_s=0.5, cap_s=3.0, jitter="full")
    assert policy.delay(2, rand=lambda: 0.25) == 0.25 and policy.delay(9, rand=lambda: 0.5) == 1.5


def test_a_call_is_tried_again_until_it_succeeds():
    clock = Clock()
    fn, calls = failing(2)
    assert RetryPolicy(attempts=3).call(fn, sleep=clock.sleep, clock=clock) == "ok"
    assert len(calls) == 3 and clock.naps == [0.5, 1.0]


def test_the_last_failure_is_raised_when_the_attempts_are_spent():
    clock = Clock()
    fn, calls = failing(5)
    with pytest.raises(ConnectionError) as raised:
        RetryPolicy(attempts=3).call(fn, sleep=clock.sleep, clock=clock)
    assert len(calls) == 3 and raised.value.attempts == 3 and clock.naps == [0.5, 1.0]


def test_no_try_starts_past_the_deadline():
    clock = Clock()
    fn, calls = failing(100)
    with pytest.raises(ConnectionError):
        RetryPolicy(attempts=None, base_s=1, cap_s=4, deadline_s=10).call(fn, sleep=clock.sleep, clock=clock)
    assert clock.naps == [1, 2, 4] and len(calls) == 4  # the next wait (4 s) would end at 11 s


def test_failures_outside_retry_on_or_refused_by_retryable_are_raised_at_once():
    clock = Clock()
    fn, calls = failing(1, exc=ValueError("bad payload"))
    with pytest.raises(ValueError):
        RetryPolicy(retry_on=(ConnectionError,)).call(fn, sleep=clock.sleep, clock=clock)
    fn, calls2 = failing(1, exc=ConnectionError("refused for good"))
    with pytest.raises(ConnectionError):
        RetryPolicy().call(fn, retryable=lambda exc: "good" not in str(exc), sleep=clock.sleep, clock=clock)
    assert len(calls) == len(calls2) == 1 and clock.naps == []


def test_each_retry_is_reported_before_its_wait():
    clock, seen = Clock(), []
    fn, _ = failing(2)
    RetryPolicy().call(fn, sleep=clock.sleep, clock=clock, on_retry=lambda n, exc, wait: seen.append((n, wait)))
    assert seen == [(1, 0.5), (2, 1.0)]


def test_a_loops_backoff_grows_with_consecutive_failures_and_resets_on_success():
    backoff = Backoff(RetryPolicy(attempts=None, base_s=1, cap_s=30))
    assert [backoff.failed() for _ in range(3)] == [1, 2, 4]
    assert backoff.succeeded() == 3 and backoff.failures == 0 and backoff.failed() == 1


@pytest.mark.parametrize("bad", [dict(attempts=0), dict(base_s=-1), dict(factor=0.5)])
def test_a_policy_that_cannot_work_is_refused(bad):
    with pytest.raises(ValueError):
        RetryPolicy(**bad)
