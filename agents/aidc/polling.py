"""Small helpers for code that waits on other processes: bounded polling and free ports."""

from __future__ import annotations

import os
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (the kernel picks it)."""
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
