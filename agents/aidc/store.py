"""The durable store the stages meet in: fault events and node states, in SQLite (WAL).

Monitors append events; failover claims them in order and records node states. State
survives an agent restart, so a fault seen before a crash is still acted on after it,
once, and a node quarantined stays quarantined until someone releases it.

Every event carries an idempotency key, `<node>:<store id>:<event id>`: the store id is a
random id made when the database file is created, so the key stays unique even if a node's
store is deleted and recreated (event ids restart then). On a node whose agent forwards to
a remote controller (aidc.transport) the events table is also the outbox: `forwarded_at`
is set once the controller has committed the event. The controller's store inserts
forwarded events under their key with INSERT OR IGNORE, so a repeated delivery is one event.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from pathlib import Path

from aidc.events import FaultEvent
from aidc.files import enable_wal, private_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    handled_at REAL,
    outcome TEXT,
    key TEXT,                     -- idempotency key <node>:<store id>:<event id> (see above)
    forwarded_at REAL             -- when a controller's store is known to hold the event
);
CREATE INDEX IF NOT EXISTS events_pending ON events(handled_at, id);
CREATE TABLE IF NOT EXISTS node_state (
    node TEXT PRIMARY KEY,
    state TEXT NOT NULL,          -- in_service | quarantining | quarantined
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    updated_at REAL NOT NULL
);
-- Every automatic remediation (a quarantine by failover or a runbook), for escalation
-- ("remediated K times in 7 days") and the circuit breaker ("quarantines in the window").
CREATE TABLE IF NOT EXISTS remediations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    action TEXT NOT NULL,         -- the catalog action it answered (reset_gpu, reboot_node, ...)
    source TEXT NOT NULL,         -- failover | runbook
    ref TEXT NOT NULL,            -- event <id> | run <id>
    at REAL NOT NULL,
    UNIQUE(source, ref)
);
CREATE INDEX IF NOT EXISTS remediations_at ON remediations(at, node);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        private_db(self.path)  # events name nodes and faults: the owner's only
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        enable_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self.store_id = self._store_id()

    def _migrate(self) -> None:
        """Add the transport's columns to a store made before them, and key its old events.
        Under the write lock, re-checked inside it: agents and the controller may open one
        store at the same moment."""
        def columns() -> set[str]:
            return {row[1] for row in self._db.execute("PRAGMA table_info(events)")}

        if {"key", "forwarded_at"} - columns():
            with self.transaction():
                have = columns()
                for name, kind in (("key", "TEXT"), ("forwarded_at", "REAL")):
                    if name not in have:
                        self._db.execute(f"ALTER TABLE events ADD COLUMN {name} {kind}")
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_key ON events(key)")
        self._db.execute("CREATE INDEX IF NOT EXISTS events_outbox ON events(forwarded_at, node, id)")
        # node_history (escalation reads it for every event decided): without it each decision
        # scanned every event stored, and a decision cost grew with the store.
        self._db.execute("CREATE INDEX IF NOT EXISTS events_node ON events(node, id)")
        if self._db.execute("SELECT 1 FROM events WHERE key IS NULL LIMIT 1").fetchone():
            store_id = self._store_id()
            with self.transaction():
                self._db.execute("UPDATE events SET key = node || ':' || ? || ':' || id WHERE key IS NULL",
                                 (store_id,))

    def _store_id(self) -> str:
        self._db.execute("INSERT OR IGNORE INTO kv(key, value) VALUES ('store.id', ?)", (uuid.uuid4().hex,))
        return self._db.execute("SELECT value FROM kv WHERE key = 'store.id'").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction. A transaction opened inside another is part of it (the
        failover loop decides a batch of events in one commit; each decision's own
        transaction joins it), as PostgreSQL's nested transactions are savepoints of one."""
        if self._db.in_transaction:
            self._db.execute("SAVEPOINT nested")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK TO nested")
                self._db.execute("RELEASE nested")
                raise
            else:
                self._db.execute("RELEASE nested")
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    # events -----------------------------------------------------------------
    def append(self, event: FaultEvent, source: str | None = None) -> int:
        """A fault observed here; keyed `<source>:<store id>:<event id>`, where the source is the
        node whose agent writes it (default: the event's node). Failover refuses an event whose
        key names another node than the event (aidc.failover.provenance). Call inside a
        transaction (the insert and its key are two statements)."""
        cur = self._db.execute(
            "INSERT INTO events(node, payload, created_at) VALUES (?, ?, ?)",
            (event.node, event.to_json(), time.time()),
        )
        event_id = int(cur.lastrowid)
        key = f"{source or event.node}:{self.store_id}:{event_id}"
        self._db.execute("UPDATE events SET key = ? WHERE id = ?", (key, event_id))
        return event_id

    def ingest(self, key: str, event: FaultEvent) -> int | None:
        """A fault forwarded by a node's agent: its id here, or None when this key is here already."""
        now = time.time()
        cur = self._db.execute(
            "INSERT OR IGNORE INTO events(node, payload, created_at, key, forwarded_at) VALUES (?, ?, ?, ?, ?)",
            (event.node, event.to_json(), now, key, now),
        )
        return int(cur.lastrowid) if cur.rowcount else None

    def event_key(self, event_id: int) -> str | None:
        row = self._db.execute("SELECT key FROM events WHERE id = ?", (event_id,)).fetchone()
        return row[0] if row else None

    def has_key(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM events WHERE key = ?", (key,)).fetchone() is not None

    # outbox (agents that forward to a remote controller) ------------------------
    def unforwarded(self, node: str, limit: int = 100) -> list[tuple[int, str, FaultEvent]]:
        """This node's events no controller holds yet, oldest first: (id, key, event). Events a
        local controller already handled (a shared lab store) are not forwarded again."""
        rows = self._db.execute(
            "SELECT id, key, payload FROM events WHERE forwarded_at IS NULL AND node = ? AND handled_at IS NULL "
            "ORDER BY id LIMIT ?", (node, limit)).fetchall()
        return [(i, k, FaultEvent.from_json(p)) for i, k, p in rows]

    def mark_forwarded(self, event_ids: list[int]) -> None:
        now = time.time()
        with self.transaction():
            self._db.executemany("UPDATE events SET forwarded_at = ? WHERE id = ?", [(now, i) for i in event_ids])

    def outbox_depth(self, node: str) -> int:
        return self._db.execute("SELECT count(*) FROM events WHERE forwarded_at IS NULL AND node = ? "
                                "AND handled_at IS NULL", (node,)).fetchone()[0]

    def pending(self, limit: int = 100, undecided_only: bool = False) -> list[tuple[int, FaultEvent]]:
        """Events not handled yet, oldest first; `undecided_only` leaves out those waiting for
        capacity (an outcome recorded, see mark_deferred)."""
        rows = self._db.execute(
            "SELECT id, payload FROM events WHERE handled_at IS NULL"
            + (" AND outcome IS NULL" if undecided_only else "") + " ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [(i, FaultEvent.from_json(p)) for i, p in rows]

    def oldest_undecided_at(self) -> float | None:
        """When the oldest event still without any decision (not handled, not deferred) was stored."""
        return self._db.execute("SELECT min(created_at) FROM events WHERE handled_at IS NULL AND outcome IS NULL"
                                ).fetchone()[0]

    def mark_handled(self, event_id: int, outcome: str) -> None:
        self._db.execute(
            "UPDATE events SET handled_at = ?, outcome = ? WHERE id = ?", (time.time(), outcome, event_id)
        )

    def mark_deferred(self, event_id: int, outcome: str) -> None:
        """Record why an event waits (refused for capacity) and leave it pending: it is decided
        again when capacity returns, never dropped."""
        self._db.execute("UPDATE events SET outcome = ? WHERE id = ? AND handled_at IS NULL", (outcome, event_id))

    def outcome(self, event_id: int) -> str | None:
        row = self._db.execute("SELECT outcome FROM events WHERE id = ?", (event_id,)).fetchone()
        return row[0] if row else None

    def node_history(self, node: str, upto_id: int, limit: int = 1000) -> list[tuple[int, FaultEvent, str | None]]:
        """The node's events up to and including `upto_id`, newest first (at most `limit`)."""
        rows = self._db.execute("SELECT id, payload, outcome FROM events WHERE node = ? AND id <= ? "
                                "ORDER BY id DESC LIMIT ?", (node, upto_id, limit)).fetchall()
        return [(i, FaultEvent.from_json(p), o) for i, p, o in rows]

    # remediations ---------------------------------------------------------------
    def record_remediation(self, node: str, action: str, source: str, ref: str, at: float | None = None) -> None:
        """Once per (source, ref): a restart that records the same quarantine again counts it once."""
        self._db.execute("INSERT OR IGNORE INTO remediations(node, action, source, ref, at) VALUES (?, ?, ?, ?, ?)",
                         (node, action, source, ref, time.time() if at is None else at))

    def remediations(self, since: float, node: str | None = None) -> list[dict]:
        sql = "SELECT node, action, source, ref, at FROM remediations WHERE at >= ?"
        args: tuple = (since,)
        if node is not None:
            sql, args = sql + " AND node = ?", (since, node)
        return [dict(zip(("node", "action", "source", "ref", "at"), row))
                for row in self._db.execute(sql + " ORDER BY at, id", args)]

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

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def put(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )
