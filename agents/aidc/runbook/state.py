"""Durable run state: runs, their steps, per-node locks and seen alerts; in SQLite (WAL) here,
or in the shared PostgreSQL database (aidc.runbook.state_postgres, the same SQL).

Everything the engine must remember across a crash lives here. A step is marked
`running` (its intent, with the attempt count) *before* its action starts, so a restarted
engine knows which action may have happened and reconciles it instead of repeating it.
The per-node lock is a row, so it survives restarts; it is released only when its run
finishes. Each thread gets its own connection (sqlite3 connections are not shareable).
The SQL is written once for both backends: `?` placeholders, `ON CONFLICT DO NOTHING` and
`RETURNING` (SQLite 3.35+).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aidc.files import enable_wal, private_db
from aidc.process import same_process_alive, start_ticks

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    runbook TEXT NOT NULL,
    node TEXT NOT NULL,
    status TEXT NOT NULL,            -- pending | running | awaiting_approval | done | failed
    trigger TEXT NOT NULL,           -- JSON: who/what started it (alert labels, user)
    owner TEXT,                      -- host:pid:start-ticks of the process executing it
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,        -- also the executor's lease, renewed while it drives the run
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_active ON runs(status);
CREATE TABLE IF NOT EXISTS steps (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    step_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,             -- main | on_failure
    status TEXT NOT NULL,            -- pending | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS node_locks (
    node TEXT PRIMARY KEY,
    run_id INTEGER NOT NULL,
    acquired_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts_seen (
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    run_id INTEGER,
    first_seen REAL NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (fingerprint, starts_at)
);
CREATE TABLE IF NOT EXISTS approvals (
    run_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    approved_by TEXT NOT NULL,
    approved_at REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
"""

ACTIVE = ("pending", "running", "awaiting_approval")


@dataclass(frozen=True)
class RunRow:
    id: int
    runbook: str
    node: str
    status: str
    trigger: dict
    owner: str | None
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StepRow:
    run_id: int
    idx: int
    step_id: str
    kind: str
    phase: str
    status: str
    attempts: int
    started_at: float | None
    finished_at: float | None
    result: dict | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# An executor renews its run's lease (runs.updated_at) every LEASE_S / 3 seconds. Another
# host's executor whose lease is older than this is taken for dead: its host or pod is gone
# (a replaced pod comes back under a new hostname).
LEASE_S = 30.0


def this_owner() -> str:
    # The start time tells this process from an earlier one with the same pid: a receiver
    # running as a container's PID 1 comes back as PID 1 after a restart.
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{start_ticks(pid) or 0}"


def owner_alive(owner: str | None, lease_renewed_at: float | None = None) -> bool:
    """Whether the executor named by `host:pid[:start-ticks]` still runs.

    This host's processes are checked directly; another host's executor counts as alive
    while its lease is fresh."""
    if not owner:
        return False
    host, pid, ticks = (owner.split(":") + [""])[:3]
    if host != socket.gethostname():
        return lease_renewed_at is not None and time.time() - lease_renewed_at < LEASE_S
    try:
        pid_number = int(pid)
    except ValueError:
        return True  # not an owner this code wrote: never take its run over
    # Another user's process cannot be our executor; another start time means the pid was reused.
    return same_process_alive(pid_number, ticks if ticks != "0" else None)


class RunState:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        private_db(self.path)
        self._local = threading.local()
        self.db.executescript(SCHEMA)

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        enable_wal(conn)  # retried: another process may be opening the new database too
        # FULL: a step's intent must be on disk before its action starts.
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def transaction(self):
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    # runs -------------------------------------------------------------------
    def create_run(self, db: sqlite3.Connection, runbook: str, node: str, trigger: dict,
                   steps: list[tuple[str, str]]) -> int:
        """Insert a run, its pending steps and its node lock (inside the caller's transaction)."""
        now = time.time()
        run_id = int(db.execute(
            "INSERT INTO runs(runbook, node, status, trigger, created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?) "
            "RETURNING id", (runbook, node, json.dumps(trigger, sort_keys=True, default=str), now, now)).fetchone()[0])
        db.executemany("INSERT INTO steps(run_id, idx, step_id, kind, phase, status) VALUES (?, ?, ?, ?, 'main', 'pending')",
                       [(run_id, i, sid, kind) for i, (sid, kind) in enumerate(steps)])
        db.execute("INSERT INTO node_locks(node, run_id, acquired_at) VALUES (?, ?, ?)", (node, run_id, now))
        return run_id

    def lock_holder(self, db: sqlite3.Connection, node: str) -> int | None:
        row = db.execute("SELECT run_id FROM node_locks WHERE node = ?", (node,)).fetchone()
        return row[0] if row else None

    def active_run(self, db: sqlite3.Connection, runbook: str, node: str) -> int | None:
        marks = ",".join("?" * len(ACTIVE))
        row = db.execute(f"SELECT id FROM runs WHERE runbook = ? AND node = ? AND status IN ({marks}) "
                         "ORDER BY id DESC LIMIT 1", (runbook, node, *ACTIVE)).fetchone()
        return row[0] if row else None

    def last_finished(self, db: sqlite3.Connection, runbook: str, node: str) -> tuple[int, float] | None:
        row = db.execute("SELECT id, finished_at FROM runs WHERE runbook = ? AND node = ? AND finished_at IS NOT NULL "
                         "ORDER BY finished_at DESC LIMIT 1", (runbook, node)).fetchone()
        return (row[0], row[1]) if row else None

    def get_run(self, run_id: int) -> RunRow:
        row = self.db.execute("SELECT id, runbook, node, status, trigger, owner, error, created_at, updated_at, "
                              "finished_at FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        return RunRow(row[0], row[1], row[2], row[3], json.loads(row[4]), *row[5:])

    def runs(self, status: tuple[str, ...] | None = None, node: str | None = None) -> list[RunRow]:
        sql, args, where = "SELECT id FROM runs", [], []
        if status:
            where.append(f"status IN ({','.join('?' * len(status))})"), args.extend(status)
        if node:
            where.append("node = ?"), args.append(node)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [self.get_run(r[0]) for r in self.db.execute(sql + " ORDER BY id", args).fetchall()]

    def set_run_status(self, run_id: int, status: str, error: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            finished = now if status in ("done", "failed") else None
            db.execute("UPDATE runs SET status = ?, error = COALESCE(?, error), updated_at = ?, "
                       "finished_at = COALESCE(?, finished_at) WHERE id = ?", (status, error, now, finished, run_id))
            if finished:
                db.execute("DELETE FROM node_locks WHERE run_id = ?", (run_id,))
                db.execute("UPDATE runs SET owner = NULL WHERE id = ?", (run_id,))

    def claim(self, run_id: int, owner: str | None = None) -> bool:
        """Make this process the run's executor unless a live process already is."""
        owner = owner or this_owner()
        with self.transaction() as db:
            row = db.execute("SELECT owner, status, updated_at FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row[1] not in ACTIVE:
                return False
            if row[0] and row[0] != owner and owner_alive(row[0], row[2]):
                return False
            db.execute("UPDATE runs SET owner = ?, updated_at = ? WHERE id = ?", (owner, time.time(), run_id))
            return True

    def renew(self, run_id: int) -> None:
        """Renew this process's lease on a run it executes."""
        self.db.execute("UPDATE runs SET updated_at = ? WHERE id = ? AND owner = ?", (time.time(), run_id, this_owner()))

    def disown(self, run_id: int) -> None:
        self.db.execute("UPDATE runs SET owner = NULL WHERE id = ? AND owner = ?", (run_id, this_owner()))

    # steps ------------------------------------------------------------------
    def steps(self, run_id: int) -> list[StepRow]:
        rows = self.db.execute("SELECT run_id, idx, step_id, kind, phase, status, attempts, started_at, finished_at, "
                               "result FROM steps WHERE run_id = ? ORDER BY idx", (run_id,)).fetchall()
        return [StepRow(*r[:9], json.loads(r[9]) if r[9] else None) for r in rows]

    def mark_step_running(self, run_id: int, idx: int) -> None:
        """The intent record: written (and synced) before the step's action starts."""
        with self.transaction() as db:
            self.start_step(db, run_id, idx)

    def start_step(self, db, run_id: int, idx: int) -> None:
        """mark_step_running inside the caller's transaction (one that also checked the blast radius)."""
        db.execute("UPDATE steps SET status = 'running', attempts = attempts + 1, "
                   "started_at = COALESCE(started_at, ?) WHERE run_id = ? AND idx = ?", (time.time(), run_id, idx))
        db.execute("UPDATE runs SET status = 'running', updated_at = ? WHERE id = ?", (time.time(), run_id))

    def finish_step(self, run_id: int, idx: int, status: str, result: dict) -> None:
        self.db.execute("UPDATE steps SET status = ?, finished_at = ?, result = ? WHERE run_id = ? AND idx = ?",
                        (status, time.time(), json.dumps(result, sort_keys=True, default=str), run_id, idx))

    def append_failure_steps(self, run_id: int, steps: list[tuple[str, str]]) -> None:
        """Add the runbook's on_failure steps once (a resumed run must not add them twice)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM steps WHERE run_id = ? AND phase = 'on_failure'", (run_id,)).fetchone():
                return
            start = db.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM steps WHERE run_id = ?", (run_id,)).fetchone()[0]
            db.executemany("INSERT INTO steps(run_id, idx, step_id, kind, phase, status) VALUES (?, ?, ?, ?, "
                           "'on_failure', 'pending')", [(run_id, start + i, s, k) for i, (s, k) in enumerate(steps)])

    def running_quarantines(self, db: sqlite3.Connection, exclude_run: int) -> list[str]:
        """Nodes whose quarantine is in flight in another active run (blast-radius reservations)."""
        return [r[0] for r in db.execute(
            "SELECT DISTINCT runs.node FROM steps JOIN runs ON runs.id = steps.run_id WHERE steps.kind = 'quarantine' "
            "AND steps.status = 'running' AND runs.id != ?", (exclude_run,))]

    # alerts and approvals ---------------------------------------------------
    def alert_seen(self, db: sqlite3.Connection, fingerprint: str, starts_at: str) -> int | None | bool:
        """False when never seen; else the run id it started or joined (None when it started none)."""
        row = db.execute("SELECT run_id FROM alerts_seen WHERE fingerprint = ? AND starts_at = ?",
                         (fingerprint, starts_at)).fetchone()
        if row is None:
            return False
        db.execute("UPDATE alerts_seen SET repeats = repeats + 1 WHERE fingerprint = ? AND starts_at = ?",
                   (fingerprint, starts_at))
        return row[0]

    def record_alert(self, db: sqlite3.Connection, fingerprint: str, starts_at: str, run_id: int | None) -> None:
        db.execute("INSERT INTO alerts_seen(fingerprint, starts_at, run_id, first_seen) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT DO NOTHING", (fingerprint, starts_at, run_id, time.time()))

    def forget_alert(self, db: sqlite3.Connection, fingerprint: str, starts_at: str) -> None:
        db.execute("DELETE FROM alerts_seen WHERE fingerprint = ? AND starts_at = ?", (fingerprint, starts_at))

    def alert_repeats(self, fingerprint: str) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(repeats), 0) FROM alerts_seen WHERE fingerprint = ?",
                              (fingerprint,)).fetchone()
        return int(row[0])

    def approve(self, run_id: int, idx: int, by: str) -> None:
        self.db.execute("INSERT INTO approvals(run_id, idx, approved_by, approved_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT DO NOTHING", (run_id, idx, by, time.time()))

    def approval(self, run_id: int, idx: int) -> str | None:
        row = self.db.execute("SELECT approved_by FROM approvals WHERE run_id = ? AND idx = ?", (run_id, idx)).fetchone()
        return row[0] if row else None
