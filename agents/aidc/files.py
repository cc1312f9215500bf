"""Private files: what aidc creates (databases, audit anchors, notify files) only its owner reads.

Directories aidc creates are 0700 and files 0600, whatever the umask. Existing files and
directories are left as they are: an operator who chose wider permissions (a shared group
directory) keeps them. SQLite creates a database's `-wal`, `-shm` and `-journal` files with
the database file's own permissions, so creating the database file 0600 first covers them.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | Path) -> Path:
    """Create `path` and any missing parents 0700 (existing ones untouched); return it."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it in between: theirs, as it is
            continue
        os.chmod(directory, DIR_MODE)  # mkdir's mode is masked by the umask; this is not
    return path


def private_opener(path: str, flags: int) -> int:
    """`open(path, mode, opener=private_opener)`: a file it creates is 0600."""
    return os.open(path, flags, FILE_MODE)


def private_file(path: str | Path) -> Path:
    """Create `path` (and its directory) 0600 if it does not exist yet; return it."""
    path = Path(path)
    private_dir(path.parent)
    try:
        # O_EXCL: an existing file is not opened at all (a reader without write access to it
        # must still get as far as SQLite's read-only fallback).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
    return path


def private_db(path: str | Path) -> Path:
    """Call before `sqlite3.connect(path)`: the database (and so its -wal/-shm) is created 0600.

    An empty file is a valid empty SQLite database."""
    return private_file(path)


def enable_wal(db: sqlite3.Connection, within_s: float = 30.0) -> None:
    """Switch a connection to WAL. Two processes opening a new database at once (the agent and its
    forwarder, two controllers on one audit log) can get SQLITE_BUSY from this switch without SQLite's busy handler waiting, so
    it is retried here, bounded."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
