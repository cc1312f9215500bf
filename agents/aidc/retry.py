"""One retry policy for aidc's outgoing calls: how many tries, how long to wait between them, until
when, and which failures are worth another try.

Two shapes use it. A bounded call (a notifier's POST) runs `RetryPolicy.call(fn)`: tries until
fn returns, the attempts or the deadline are spent, or a failure is not retryable; the last
failure is raised. A daemon's loop (the transport forwarder, the Kubernetes fault watch, the
eviction of pods a PodDisruptionBudget protects) keeps going on its own terms and asks a
`Backoff` how long to wait after each failure, and forgets them after a success.

The wait after the n-th consecutive failure is `min(cap_s, base_s * factor ** (n - 1))`; with
`jitter="full"` a uniform draw from 0 to that (so agents that lost the controller together do not
come back at one instant). Sleep, clock and random source are injectable: tests assert the
waits, never wall-clock time. (tenacity does the same; this is about sixty lines and keeps the
agent image's dependencies as they are.)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int | None = 3  # tries in all, the first included; None: no limit (a deadline or a loop's own stop)
    base_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    jitter: Literal["none", "full"] = "none"
    deadline_s: float | None = None  # no new try would start after this many seconds
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self):
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if self.base_s < 0 or self.cap_s < 0 or self.factor < 1:
            raise ValueError("base_s and cap_s must not be negative, factor at least 1")

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after `failures` consecutive failures (1: after the first)."""
        ceiling = min(self.cap_s, self.base_s * self.factor ** min(max(failures - 1, 0), 64))
        return ceiling * rand() if self.jitter == "full" else ceiling

    def call(self, fn: Callable[[], T], *, retryable: Callable[[BaseException], bool] = lambda _exc: True,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
             rand: Callable[[], float] = random.random,
             on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
        """fn()'s result. A failure in `retry_on` that `retryable` accepts is tried again after
        delay(); other failures, and the last one when tries or the deadline run out, are raised
        (`.attempts` on it says how many tries were made)."""
        started = clock()
        failures = 0
        while True:
            try:
                return fn()
            except self.retry_on as exc:
                failures += 1
                wait = self.delay(failures, rand)
                out_of_tries = self.attempts is not None and failures >= self.attempts
                past_deadline = self.deadline_s is not None and clock() + wait - started > self.deadline_s
                if out_of_tries or past_deadline or not retryable(exc):
                    exc.attempts = failures
                    raise
                if on_retry is not None:
                    on_retry(failures, exc, wait)
                sleep(wait)


class Backoff:
    """A loop's count of consecutive failures and the wait each one asks for (RetryPolicy.delay)."""

    def __init__(self, policy: RetryPolicy, rand: Callable[[], float] = random.random):
        self.policy, self.rand = policy, rand
        self.failures = 0

    def failed(self) -> float:
        """Count a failure; the seconds to wait before the next try."""
        self.failures += 1
        return self.policy.delay(self.failures, self.rand)

    def succeeded(self) -> int:
        """Forget the failures (returns how many there were)."""
        was, self.failures = self.failures, 0
        return was
