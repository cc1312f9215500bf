"""Files aidc writes: never through a symbolic link, and only its owner reads what is private.

Directories aidc creates are 0700 and files 0600, whatever the umask. Existing files and
directories are left as they are: an operator who chose wider permissions (a shared group
directory) keeps them. SQLite creates a database's `-wal`, `-shm` and `-journal` files with
the database file's own permissions, so creating the database file 0600 first covers them.

Every file aidc creates, appends to or replaces is opened with O_NOFOLLOW (or, for SQLite,
which opens the file itself, checked with lstat first): a link planted where a state, audit,
report or notify file goes would otherwise make aidc write, as its user, into whatever the
link names. Such a link is refused with LinkRefused and the file it names is left untouched.
Only the last component is checked; a directory on the way may be a link (/var/lib/aidc moved
to a data disk), since whoever can replace a directory of the path owns the file anyway.

A file derived from another (a report of the audit log, a certificate exported from it) gets
the mode of its source, never wider: a 0600 log does not become a 0644 report.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

from aidc.errors import AidcError

DIR_MODE = 0o700
FILE_MODE = 0o600
# For files other tools read (lab journals, lease files): what open() gives under umask 022.
SHARED_MODE = 0o644
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


class LinkRefused(AidcError):
    """aidc does not create, append to or replace a file through a symbolic link."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"{path} is a symbolic link; aidc does not write through links "
                         "(remove it, or give the path of the real file)")


def refuse_link(path: str | Path) -> Path:
    """`path`, or LinkRefused when it is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise LinkRefused(path)
    return Path(path)


def open_nofollow(path: str | Path, flags: int, mode: int = FILE_MODE) -> int:
    """os.open with O_NOFOLLOW: LinkRefused instead of following a link at `path`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        # ELOOP: the last component is a link. With O_CREAT|O_EXCL Linux reports EEXIST for a
        # link instead, so that case is told apart here rather than read as "someone else's file".
        if exc.errno == errno.ELOOP or (exc.errno == errno.EEXIST and os.path.islink(path)):
            raise LinkRefused(path) from None
        raise


def private_opener(path: str, flags: int) -> int:
    """`open(path, mode, opener=private_opener)`: a file it creates is 0600; a link is refused."""
    return open_nofollow(path, flags, FILE_MODE)


def shared_opener(path: str, flags: int) -> int:
    """`open(path, mode, opener=shared_opener)`: a file it creates is SHARED_MODE (less the
    umask); a link is refused. For logs and lab files other tools read."""
    return open_nofollow(path, flags, SHARED_MODE)


def touch(path: str | Path, mode: int = SHARED_MODE) -> Path:
    """Create `path` if missing (its contents untouched if not); a link is refused."""
    os.close(open_nofollow(path, os.O_WRONLY | os.O_CREAT, mode))
    return Path(path)


def append_bytes(path: str | Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Append `data` in one write (a line stays whole among concurrent writers); a file it
    creates gets `mode`; a link is refused."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, mode: int = FILE_MODE, durable: bool = False) -> Path:
    """Replace `path` with `data`: a reader sees the old or the new file, never half of one.

    The new file gets `mode`, narrowed by the umask, never widened. A link at `path` is refused (a
    rename would replace the link, not its target, but a link there is someone's mistake or
    plan, and is reported, not silently removed). durable: fsync before the rename.
    """
    path = Path(path)
    refuse_link(path)
    # Random as well as pid and thread: a restarted process can get the pid and thread id of
    # one that crashed here (in a container, always), and O_EXCL would then trip on its leftover.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}.tmp")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def derived_mode(source: str | Path) -> int:
    """The mode for a file made from `source`: the source's read/write bits, never wider."""
    return stat.S_IMODE(os.stat(source).st_mode) & 0o666


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


def private_file(path: str | Path) -> Path:
    """Create `path` (and its directory) 0600 if it does not exist yet; return it. A link at
    `path` is refused."""
    path = Path(path)
    private_dir(path.parent)
    try:
        # O_EXCL: an existing file is not opened at all (a reader without write access to it
        # must still get as far as SQLite's read-only fallback).
        os.close(open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
    return path


def private_db(path: str | Path) -> Path:
    """Call before `sqlite3.connect(path)`: the database (and so its -wal/-shm) is created 0600.

    SQLite opens these files itself, following links, so a link at the database or at one of
    its -wal, -shm or -journal files is refused here. An empty file is a valid empty database."""
    path = Path(path)
    for side in SQLITE_SIDE_FILES:
        refuse_link(path.with_name(path.name + side))
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
