"""The durable store the stages meet in: fault events and node states, in SQLite (WAL).

Monitors append events; failover claims them in order and records node states. State
survives an agent restart, so a fault seen before a crash is still acted on after it,
once, and a node quarantined stays quarantined until someone releases it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from aidc.events import FaultEvent

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    handled_at REAL,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS events_pending ON events(handled_at, id);
CREATE TABLE IF NOT EXISTS node_state (
    node TEXT PRIMARY KEY,
    state TEXT NOT NULL,          -- in_service | quarantining | quarantined
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    # events -----------------------------------------------------------------
    def append(self, event: FaultEvent) -> int:
        cur = self._db.execute(
            "INSERT INTO events(node, payload, created_at) VALUES (?, ?, ?)",
            (event.node, event.to_json(), time.time()),
        )
        return int(cur.lastrowid)

    def pending(self, limit: int = 100) -> list[tuple[int, FaultEvent]]:
        rows = self._db.execute(
            "SELECT id, payload FROM events WHERE handled_at IS NULL ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [(i, FaultEvent.from_json(p)) for i, p in rows]

    def mark_handled(self, event_id: int, outcome: str) -> None:
        self._db.execute(
            "UPDATE events SET handled_at = ?, outcome = ? WHERE id = ?", (time.time(), outcome, event_id)
        )

    def events(self, node: str | None = None) -> list[tuple[int, FaultEvent, str | None]]:
        sql, args = "SELECT id, payload, outcome FROM events", ()
        if node:
            sql, args = sql + " WHERE node = ?", (node,)
        return [(i, FaultEvent.from_json(p), o) for i, p, o in self._db.execute(sql + " ORDER BY id", args)]

    # node states ------------------------------------------------------------
    def node_state(self, node: str) -> str:
        row = self._db.execute("SELECT state FROM node_state WHERE node = ?", (node,)).fetchone()
        return row[0] if row else "in_service"

    def set_node_state(self, node: str, state: str, reason: str, actor: str) -> None:
        self._db.execute(
            "INSERT INTO node_state(node, state, reason, actor, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(node) DO UPDATE SET state=excluded.state, reason=excluded.reason, "
            "actor=excluded.actor, updated_at=excluded.updated_at",
            (node, state, reason, actor, time.time()),
        )

    def nodes_in_state(self, *states: str) -> list[str]:
        marks = ",".join("?" * len(states))
        return [r[0] for r in self._db.execute(f"SELECT node FROM node_state WHERE state IN ({marks})", states)]

    # small durable settings (kernel-log offsets, breaker state) ---------------
    def get(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def put(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )
