"""Facts about local processes that survive pid reuse.

A pid alone does not name a process for long: after a restart (a container's PID 1) or
enough time, another process has it. The start time in clock ticks since boot
(/proc/PID/stat field 22) tells them apart.
"""

from __future__ import annotations

import os
from pathlib import Path


def start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None (gone, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def same_process_alive(pid: int, ticks: str | None) -> bool:
    """Whether `pid` still runs and, when `ticks` is known, is the process that had them."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not one of ours
    if ticks:
        current = start_ticks(pid)
        return current is None or current == ticks
    return True
