"""Refusals aggregated before they reach the audit log.

An authenticated caller refused (403) over and over, say an Alertmanager whose identity lacks
the `operator` role and retries every few seconds, or one gone wild at 65 a second, would write
one audit record per refusal (about 3 GB a day at that rate). Here the first refusal of an
identity for an action is recorded at once, as before; the repeats within `window_s` are counted
and recorded as one summary record (the same kind, with `count`, `first_at` and `last_at`) when
the window closes, when the table of open windows is full (the oldest is summarised first), or
at close(). Every refusal is counted in exactly one record: the sum of the records' `count`
(1 where absent) is the number of refusals. Memory is bounded by `max_keys` open windows.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

MAX_ADDRESSES = 8  # distinct client addresses kept per window, for the summary


@dataclass
class _Window:
    opened: float
    actor: str
    node: str | None
    reason: str
    payload: dict
    count: int = 0  # repeats after the first refusal, not yet recorded
    first_at: float = 0.0  # wall-clock times of the first and last repeat
    last_at: float = 0.0
    addresses: list = field(default_factory=list)


class AggregatedRefusals:
    """An audit log's `append` for refusals (what aidc.identity.authorize calls): pass one where
    an audit log is expected."""

    def __init__(self, audit, window_s: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        if not window_s > 0 or max_keys < 1:
            raise ValueError(f"window_s must be positive and max_keys at least 1, not {window_s!r}, {max_keys!r}")
        self.audit, self.window_s, self.max_keys, self.clock, self.wall = audit, window_s, max_keys, clock, wall
        self.open_windows: dict[tuple, _Window] = {}  # insertion order: oldest first
        self._lock = threading.Lock()

    def append(self, kind: str, reason: str, *, actor: str, node: str | None = None, payload: dict | None = None):
        payload = dict(payload or {})
        key = (kind, actor, payload.get("action"), node)
        now = self.clock()
        with self._lock:
            self._flush(now)
            window = self.open_windows.get(key)
            if window is not None:
                window.count += 1
                window.last_at = self.wall()
                window.first_at = window.first_at or window.last_at
                address = payload.get("address")
                if address and address not in window.addresses and len(window.addresses) < MAX_ADDRESSES:
                    window.addresses.append(address)
                return None
            if len(self.open_windows) >= self.max_keys:
                oldest = next(iter(self.open_windows))
                self._summarise(oldest, self.open_windows.pop(oldest))
            self.open_windows[key] = _Window(now, actor, node, reason, payload)
            # The first refusal is on record at once, before any window closes.
            return self.audit.append(kind, reason, actor=actor, node=node, payload=payload)

    def flush_due(self) -> None:
        """Summarise the windows that have closed (call it now and then: the receiver's scanner does)."""
        with self._lock:
            self._flush(self.clock())

    def close(self) -> None:
        """Summarise every open window (at shutdown)."""
        with self._lock:
            while self.open_windows:
                key = next(iter(self.open_windows))
                self._summarise(key, self.open_windows.pop(key))

    def _flush(self, now: float) -> None:
        for key in [k for k, w in self.open_windows.items() if now - w.opened >= self.window_s]:
            self._summarise(key, self.open_windows.pop(key))

    def _summarise(self, key: tuple, window: _Window) -> None:
        if window.count == 0:
            return
        payload = {**window.payload, "count": window.count, "window_s": self.window_s,
                   "first_at": window.first_at, "last_at": window.last_at,
                   "addresses": window.addresses}
        self.audit.append(key[0], f"{window.count} more refusal(s) within {self.window_s:g} s: {window.reason}",
                          actor=window.actor, node=window.node, payload=payload)
