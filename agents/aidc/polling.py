"""Small helpers for code that waits on other processes: bounded polling and free ports."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(what: str, predicate: Callable[[], T], timeout_s: float, poll_s: float = 0.05,
             error: type[Exception] = TimeoutError) -> T:
    """Poll `predicate` until it returns something truthy (returned); raise `error` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise error(f"timed out after {timeout_s:g} s waiting for {what}")


# Ports handed to a daemon that binds them later are drawn below the kernel's ephemeral range:
# a port the kernel picks for bind(0) is an ephemeral one, and between the pick and the daemon's
# bind any outgoing connection on the host may take it (seen: a lab slurmd failing with "Address
# already in use" while its peers connected). Nothing takes a port below the range unasked.
LISTEN_PORTS_FROM = 20000


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1", attempts: int = 64) -> int:
    """A TCP port on `host` that nothing listens on right now, below the ephemeral range when
    there is room there (see LISTEN_PORTS_FROM), else one the kernel picks."""
    low = _ephemeral_low()
    for _ in range(attempts if low - LISTEN_PORTS_FROM >= 1000 else 0):
        port = random.randrange(LISTEN_PORTS_FROM, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use: another draw
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process_group(proc: "subprocess.Popen", timeout_s: float = 10.0) -> None:
    """Stop a process started with start_new_session=True, children included: TERM, then KILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        proc.wait(timeout=timeout_s)


# --- waiting for a file to change, without polling it ----------------------------------------
# inotify(7) through libc: the standard library has no binding, and a sleep-and-stat loop is
# what this replaces (its cost is CPU every interval, its latency one interval).
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x002, 0x004, 0x008
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x040, 0x080, 0x100, 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_ONLYDIR = 0x01000000
_CHANGES = _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT_HEADER = 16  # struct inotify_event: int wd; uint32 mask, cookie, len; then len bytes of name
_libc = None


def _inotify_libc():
    global _libc
    if _libc is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc = libc
    return _libc


class DirectoryWatch:
    """Wake when a file in one directory whose name passes `match` is written, truncated,
    created, renamed or deleted (inotify on the directory, so a file that does not exist yet
    or is rotated away is still seen). `fileno()` is readable when something may have
    changed, for poll(); `wait(timeout_s)` blocks on it. Raises OSError where inotify is
    unavailable (not Linux, no watches left): callers fall back to polling."""

    def __init__(self, directory: str | os.PathLike, match: Callable[[str], bool]):
        import ctypes

        libc = _inotify_libc()
        self.match = match
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), _CHANGES | _IN_ONLYDIR) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")

    def fileno(self) -> int:
        return self._fd

    def changed(self) -> bool:
        """Consume the queued notifications; True when one is for a matching name (or the
        kernel's queue overflowed, so a change may have been dropped). Never blocks."""
        import struct

        hit = False
        for _ in range(1024):  # bounded: 1024 reads of up to 64 KiB of notifications
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT_HEADER <= len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + _EVENT_HEADER: offset + _EVENT_HEADER + length].rstrip(b"\0")
                offset += _EVENT_HEADER + length
                if mask & _IN_Q_OVERFLOW or (name and self.match(os.fsdecode(name))):
                    hit = True
        return hit

    def wait(self, timeout_s: float) -> bool:
        """Block up to timeout_s for a matching change; True when one came."""
        import select

        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller = select.poll()  # poll, not select: no limit on descriptor numbers
            poller.register(self._fd, select.POLLIN)
            if poller.poll(remaining * 1000) and self.changed():
                return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
