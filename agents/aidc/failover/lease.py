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

Lease state that cannot be read ages out like a stale beat: a beat that is missing, empty,
not one a controller writes (garbage, changing or not), not a regular file (a directory, a
FIFO, a symlink) or larger than a beat can be counts as "no beat", and "no beat" unchanged for
`ttl_s` is expiry. Only gen-<N>.json with 1..18 digits is a generation; other names are strays.
The last generation the pattern can name has no successor, so when it goes stale it is moved
aside (no controller ever gets there: it would take 10^18 takeovers) and the next one below it
is claimed. The directory is 0700 and its files 0600 whatever the umask: who can write it can
stop failover.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
import uuid
from pathlib import Path

from aidc.files import DIR_MODE, FILE_MODE, LinkRefused, open_nofollow, private_dir, write_atomic

_GEN = re.compile(r"^gen-([0-9]{1,18})\.json$")
MAX_GEN = 10**18 - 1  # the largest generation _GEN can name
MAX_BEAT_BYTES = 4096  # a beat is a small JSON object; anything larger is not one


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
        # Observation of somebody else's lease: (generation, beat as read, when it last changed).
        self._seen: tuple[int, tuple | None, float] | None = None

    # -- public ------------------------------------------------------------------------
    def hold(self) -> bool:
        """Acquire or renew; True while this process holds the lease. Call every poll."""
        self._private_dir()
        top = self._top()
        if self.generation is not None:
            if top == self.generation and self._renew():
                return True
            self.generation = None  # superseded, or could not renew in time: fence ourselves
        if top is None:
            return self._claim(1)
        beat = self._read_beat(top)
        now = self.clock()
        if beat is not None and beat[0] == "released":
            return self._take_over(top)
        if self._seen is None or self._seen[0] != top or self._seen[1] != beat:
            self._seen = (top, beat, now)  # None (no readable beat) is a value that ages too
            return False
        if now - self._seen[2] >= self.ttl_s:
            return self._take_over(top)
        return False

    def held(self) -> bool:
        """Whether acting now is safe: we hold the newest generation and renewed recently."""
        margin = min(1.0, self.ttl_s / 4)
        if self.generation is None or self.clock() - self._renewed_at >= self.ttl_s - margin:
            return False
        try:
            return self._top() == self.generation
        except OSError:  # the directory cannot be read: not knowing means not acting
            return False

    def release(self) -> None:
        if self.generation is not None and self._top() == self.generation:
            self._write_beat(self.generation, {"holder": self.holder, "released": True})
        self.generation = None

    def describe(self) -> dict:
        try:
            current = self.current()
        except OSError as exc:  # described also when the directory cannot be read (audited as such)
            current = {"error": str(exc)}
        return {"holder": self.holder, "generation": self.generation, "dir": str(self.dir), "ttl_s": self.ttl_s,
                "current": current}

    def current(self) -> dict | None:
        """Who holds the newest generation, as written in its file."""
        top = self._top()
        if top is None:
            return None
        try:
            written = json.loads(_read_small(self.dir / f"gen-{top}.json"))
        except (OSError, ValueError):
            written = None
        return {**written, "generation": top} if isinstance(written, dict) else {"generation": top}

    # -- internals --------------------------------------------------------------------------
    def _private_dir(self) -> None:
        private_dir(self.dir)
        st = os.stat(self.dir)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"lease directory {self.dir} is not a directory")
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.chmod(self.dir, DIR_MODE)  # made by an older aidc under the umask: who can write it can stop failover

    def _take_over(self, top: int) -> bool:
        """Claim the generation after `top`, which this contender saw released or stale."""
        if top < MAX_GEN:
            return self._claim(top + 1)
        # No successor can be named. Move the stale generation aside (rename works on any kind
        # of entry); of contenders racing here only the one whose rename succeeded claims.
        if not _move_aside(self.dir, f"gen-{top}.json"):
            return False
        below = self._top()
        return self._claim(1 if below is None else below + 1)

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
            fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except (FileExistsError, LinkRefused):
            return False  # another contender won this generation (or left a link: it ages out)
        with os.fdopen(fd, "w") as f:
            json.dump({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                       "claimed_at": time.time()}, f)
        self.generation, self._beats, self._seen = gen, 0, None
        if (self.dir / f"gen-{gen}.beat").exists() or (self.dir / f"gen-{gen}.beat").is_symlink():
            # Nobody but this generation's holder writes its beat: whatever is there is a stray
            # (a directory would make every beat fail), so it is moved aside.
            _move_aside(self.dir, f"gen-{gen}.beat")
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
        except (OSError, LinkRefused):
            return self.held()
        self._renewed_at = now
        return True

    def _write_beat(self, gen: int, data: dict) -> None:
        # A fresh random temporary name each time (write_atomic), so no stray entry can block the
        # write; a link planted at the beat's name is refused, and the renewal fails like any other.
        write_atomic(self.dir / f"gen-{gen}.beat", json.dumps(data, sort_keys=True), FILE_MODE)

    def _read_beat(self, gen: int) -> tuple | None:
        """The beat as ("beat", holder, n) or ("released", holder); None when there is no beat a
        controller could have written (missing, unreadable, not a regular file, too large, garbage)."""
        try:
            beat = json.loads(_read_small(self.dir / f"gen-{gen}.beat"))
        except (OSError, ValueError):
            return None
        if not isinstance(beat, dict) or not isinstance(beat.get("holder"), str):
            return None
        if beat.get("released") is True:
            return ("released", beat["holder"])
        n = beat.get("beat")
        if type(n) is int and n > 0:
            return ("beat", beat["holder"], n)
        return None


def _move_aside(directory: Path, name: str) -> bool:
    """Rename an entry of any kind out of the lease's names; False if it was not there (any more)."""
    try:
        os.rename(directory / name, directory / f".stale-{name}.{uuid.uuid4().hex}")
    except OSError:
        return False
    return True


def _read_small(path: Path) -> bytes:
    """A regular file's bytes, at most MAX_BEAT_BYTES; never follows a symlink nor waits on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = os.read(fd, MAX_BEAT_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BEAT_BYTES:
        raise ValueError(f"{path} is larger than {MAX_BEAT_BYTES} bytes")
    return data
