"""The controller lease: one failover controller acts at a time, across hosts and crashes.

A lease lives in a directory every controller can reach (a shared filesystem for controllers
on several hosts). Generation N is the file `gen-<N>.json`, created with O_EXCL, so exactly one
contender wins each generation, on a local disk and on NFS alike. The holder proves it is alive
by rewriting `gen-<N>.beat` (an increasing counter) every ttl/3.

Expiry is judged on each observer's *own* monotonic clock: a contender takes over only after it
has seen the beat unchanged for `ttl_s`. No two hosts' clocks are ever compared, so clock skew
cannot hand the lease out early. A holder that could not renew within `ttl_s - margin` (a pause,
a hung filesystem) or that sees a higher generation stops acting: it fences itself.

A crash (kill -9, a dead host) simply stops the beat: another controller takes over within
`ttl_s` plus one poll. A clean stop writes `released` so the next one takes over at once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from aidc.files import SHARED_MODE, open_nofollow, write_atomic

_GEN = re.compile(r"^gen-([0-9]{1,18})\.json$")


class Lease:
    def __init__(self, directory: str | os.PathLike, holder: str | None = None, ttl_s: float = 10.0,
                 clock=time.monotonic):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.dir = Path(directory)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.ttl_s = ttl_s
        self.clock = clock
        self.generation: int | None = None   # the generation this process holds
        self._renewed_at = 0.0
        self._beats = 0
        # Observation of somebody else's lease: (generation, beat text, when it last changed).
        self._seen: tuple[int, str, float] | None = None

    # -- public ------------------------------------------------------------------------
    def hold(self) -> bool:
        """Acquire or renew; True while this process holds the lease. Call every poll."""
        self.dir.mkdir(parents=True, exist_ok=True)
        top = self._top()
        if self.generation is not None:
            if top == self.generation and self._renew():
                return True
            self.generation = None  # superseded, or could not renew in time: fence ourselves
        if top is None:
            return self._claim(1)
        beat = self._read_beat(top)
        now = self.clock()
        if beat is not None and '"released": true' in beat:
            return self._claim(top + 1)
        if self._seen is None or self._seen[0] != top or self._seen[1] != beat:
            self._seen = (top, beat or "", now)
            return False
        if now - self._seen[2] >= self.ttl_s:
            return self._claim(top + 1)
        return False

    def held(self) -> bool:
        """Whether acting now is safe: we hold the newest generation and renewed recently."""
        margin = min(1.0, self.ttl_s / 4)
        return (self.generation is not None and self._top() == self.generation
                and self.clock() - self._renewed_at < self.ttl_s - margin)

    def release(self) -> None:
        if self.generation is not None and self._top() == self.generation:
            self._write_beat(self.generation, {"holder": self.holder, "released": True})
        self.generation = None

    def describe(self) -> dict:
        return {"holder": self.holder, "generation": self.generation, "dir": str(self.dir), "ttl_s": self.ttl_s,
                "current": self.current()}

    def current(self) -> dict | None:
        """Who holds the newest generation, as written in its file."""
        top = self._top()
        if top is None:
            return None
        try:
            return {**json.loads((self.dir / f"gen-{top}.json").read_text()), "generation": top}
        except (OSError, ValueError):
            return {"generation": top}

    # -- internals --------------------------------------------------------------------------
    def _top(self) -> int | None:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return None
        gens = [int(m.group(1)) for name in names if (m := _GEN.match(name))]
        return max(gens) if gens else None

    def _claim(self, gen: int) -> bool:
        path = self.dir / f"gen-{gen}.json"
        try:
            fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SHARED_MODE)
        except FileExistsError:
            return False  # another contender won this generation
        with os.fdopen(fd, "w") as f:
            json.dump({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                       "claimed_at": time.time()}, f)
        self.generation, self._beats, self._seen = gen, 0, None
        if not self._renew():
            self.generation = None
            return False
        for name in os.listdir(self.dir):  # keep the directory small: older generations are history
            m = _GEN.match(name.replace(".beat", ".json"))
            if m and int(m.group(1)) < gen - 1:
                try:
                    os.unlink(self.dir / name)
                except OSError:
                    pass
        return True

    def _renew(self) -> bool:
        now = self.clock()
        if self._beats and now - self._renewed_at < self.ttl_s / 3:
            return self.held()
        self._beats += 1
        try:
            self._write_beat(self.generation, {"holder": self.holder, "beat": self._beats})
        except OSError:
            return self.held()
        self._renewed_at = now
        return True

    def _write_beat(self, gen: int, data: dict) -> None:
        write_atomic(self.dir / f"gen-{gen}.beat", json.dumps(data, sort_keys=True), SHARED_MODE)

    def _read_beat(self, gen: int) -> str | None:
        try:
            return (self.dir / f"gen-{gen}.beat").read_text()
        except OSError:
            return None
