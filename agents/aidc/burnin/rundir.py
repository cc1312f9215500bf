"""A burn-in run's private directory in the temp dir: node configs (they hold the run's secret),
node logs, srun's log. Removed on every exit the run's process lives through (an error, a
timeout, Ctrl-C); after one it cannot see (SIGKILL, a crash of the machine) by the next run.

The owner holds an exclusive `flock` on a file inside for as long as the run lives; the kernel
drops it when the owner dies, however it dies. A run starting sweeps the temp dir for burn-in
directories of this user whose lock it can take: their owner is gone. A directory without the
lock file is never swept: it is being created right now, or it is not aidc's to judge.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from aidc.files import open_nofollow

PREFIX = "aidc-burnin-"
OWNER_LOCK = ".owner.lock"


@contextmanager
def run_directory(kind: str) -> Iterator[Path]:
    """`with run_directory("lab") as path:` a fresh 0700 directory `aidc-burnin-<kind>-*`."""
    sweep_stale()
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
    fd = open_nofollow(path / f"{OWNER_LOCK}.new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Only now under the name a sweep looks for: no sweep can find it unlocked.
        os.rename(path / f"{OWNER_LOCK}.new", path / OWNER_LOCK)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep_stale(root: str | Path | None = None) -> list[Path]:
    """Remove the burn-in directories under `root` (default: the temp dir) whose owner died;
    return them. Best effort: one that cannot be read or removed is left as it is."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
            fd = os.open(path / OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its run is alive
        finally:
            os.close(fd)  # releases the lock taken, if it was
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
