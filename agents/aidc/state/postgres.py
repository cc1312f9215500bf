"""The shared state backend: PostgreSQL 15+ through psycopg 3, one database for every
controller replica.

The schema is versioned: `aidc_schema_version` lists the numbered migrations applied
(data/state/postgres/NNNN_name.sql), each applied in its own transaction together with its row,
under an advisory lock so replicas starting together migrate once. A database whose version is
newer than this aidc knows, whose applied migrations differ from the shipped ones, or that holds
aidc's tables without a version is refused, never guessed at.

PostgresStore is aidc.store.Store on PostgreSQL, method by method. One connection in autocommit
mode; `transaction()` is one PostgreSQL transaction. The audit log (aidc.audit.postgres) and the
runbook run state (aidc.runbook.state_postgres) live in the same database, opened through
`BACKEND` below; QmarkConnection lets them keep the SQLite code's query texts.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from aidc.errors import StateError
from aidc.events import FaultEvent

MIGRATIONS_DIR = "data/state/postgres"
# pg_advisory_xact_lock key for migrations: any fixed 64-bit number, the same in every replica.
MIGRATION_LOCK = 0x61696463_73746174  # "aidcstat"
MIN_SERVER_VERSION = 150000
OWN_TABLES = ("events", "node_state", "remediations", "kv", "audit", "audit_signature", "audit_anchor",
              "runs", "steps", "node_locks", "alerts_seen", "approvals")


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StateError("state.backend postgres needs psycopg 3: pip install 'aidc[postgres]'") from None
    return psycopg


def connect(dsn: str):
    """An autocommit connection to the state database; StateError when it cannot be reached."""
    psycopg = _psycopg()
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        # libpq's message names host and database, never the password.
        raise StateError(f"cannot reach the state database: {str(exc).strip().splitlines()[0]}") from None
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        conn.close()
        raise StateError(f"the state database runs PostgreSQL {version // 10000}; aidc needs 15 or newer")
    return conn


def migrations() -> list[tuple[int, str, str]]:
    """The shipped migrations, (number, name, SQL), numbered 1, 2, ... without gaps."""
    found = []
    for entry in resources.files("aidc").joinpath(MIGRATIONS_DIR).iterdir():
        m = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text()))
    found.sort()
    if [n for n, _name, _sql in found] != list(range(1, len(found) + 1)):
        raise StateError(f"the shipped migrations in {MIGRATIONS_DIR} are not numbered 1..{len(found)}")
    return found


def migrate(conn) -> int:
    """Bring the database to the newest shipped schema; returns its version."""
    shipped = migrations()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS aidc_schema_version (version INTEGER PRIMARY KEY, "
                     "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
        applied = conn.execute("SELECT version, name FROM aidc_schema_version ORDER BY version").fetchall()
        if applied and applied[-1][0] > len(shipped):
            raise StateError(f"the state database is at schema version {applied[-1][0]}, newer than this aidc "
                             f"knows ({len(shipped)}): upgrade aidc")
        if applied != [(n, name) for n, name, _sql in shipped[:len(applied)]]:
            raise StateError("the state database's applied migrations "
                             f"({', '.join(f'{n}_{name}' for n, name in applied)}) are not the ones this aidc ships")
        if not applied:
            present = [r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_name = ANY(%s)", (list(OWN_TABLES),))]
            if present:
                raise StateError(f"the state database has tables {', '.join(sorted(present))} but no schema "
                                 "version: not made by aidc's migrations; refusing to guess its schema")
    for number, name, sql in shipped[len(applied):]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            # Another replica may have applied it while this one waited for the lock.
            if conn.execute("SELECT 1 FROM aidc_schema_version WHERE version = %s", (number,)).fetchone():
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO aidc_schema_version(version, name, applied_at) VALUES (%s, %s, %s)",
                         (number, name, time.time()))
    return len(shipped)


class PostgresStore:
    def __init__(self, dsn: str):
        self._db = connect(dsn)
        self.path = None  # no file: other processes open the same database by DSN
        self.schema_version = migrate(self._db)
        self.store_id = self._store_id()

    def _store_id(self) -> str:
        self._db.execute("INSERT INTO kv(key, value) VALUES ('store.id', %s) ON CONFLICT (key) DO NOTHING",
                         (uuid.uuid4().hex,))
        return self._db.execute("SELECT value FROM kv WHERE key = 'store.id'").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self):
        with self._db.transaction():
            yield self._db

    def _one(self, sql: str, args: tuple = ()):
        return self._db.execute(sql, args).fetchone()

    # events -----------------------------------------------------------------
    def append(self, event: FaultEvent, source: str | None = None) -> int:
        # The id and the key that names it in one statement: nextval first, then both columns.
        return int(self._one(
            "INSERT INTO events(id, node, payload, created_at, key) "
            "SELECT n, %s, %s, %s, %s || n FROM (SELECT nextval('events_id_seq') AS n) AS s RETURNING id",
            (event.node, event.to_json(), time.time(), f"{source or event.node}:{self.store_id}:"))[0])

    def ingest(self, key: str, event: FaultEvent) -> int | None:
        now = time.time()
        row = self._one("INSERT INTO events(node, payload, created_at, key, forwarded_at) VALUES (%s, %s, %s, %s, %s) "
                        "ON CONFLICT (key) DO NOTHING RETURNING id", (event.node, event.to_json(), now, key, now))
        return int(row[0]) if row else None

    def event_key(self, event_id: int) -> str | None:
        row = self._one("SELECT key FROM events WHERE id = %s", (event_id,))
        return row[0] if row else None

    def has_key(self, key: str) -> bool:
        return self._one("SELECT 1 FROM events WHERE key = %s", (key,)) is not None

    # outbox -------------------------------------------------------------------
    def unforwarded(self, node: str, limit: int = 100) -> list[tuple[int, str, FaultEvent]]:
        rows = self._db.execute(
            "SELECT id, key, payload FROM events WHERE forwarded_at IS NULL AND node = %s AND handled_at IS NULL "
            "ORDER BY id LIMIT %s", (node, limit)).fetchall()
        return [(i, k, FaultEvent.from_json(p)) for i, k, p in rows]

    def mark_forwarded(self, event_ids: list[int]) -> None:
        self._db.execute("UPDATE events SET forwarded_at = %s WHERE id = ANY(%s)", (time.time(), list(event_ids)))

    def outbox_depth(self, node: str) -> int:
        return self._one("SELECT count(*) FROM events WHERE forwarded_at IS NULL AND node = %s "
                         "AND handled_at IS NULL", (node,))[0]

    def pending(self, limit: int = 100, undecided_only: bool = False) -> list[tuple[int, FaultEvent]]:
        rows = self._db.execute(
            "SELECT id, payload FROM events WHERE handled_at IS NULL"
            + (" AND outcome IS NULL" if undecided_only else "") + " ORDER BY id LIMIT %s", (limit,)).fetchall()
        return [(i, FaultEvent.from_json(p)) for i, p in rows]

    def oldest_undecided_at(self) -> float | None:
        return self._one("SELECT min(created_at) FROM events WHERE handled_at IS NULL AND outcome IS NULL")[0]

    def mark_handled(self, event_id: int, outcome: str) -> None:
        self._db.execute("UPDATE events SET handled_at = %s, outcome = %s WHERE id = %s",
                         (time.time(), outcome, event_id))

    def mark_deferred(self, event_id: int, outcome: str) -> None:
        self._db.execute("UPDATE events SET outcome = %s WHERE id = %s AND handled_at IS NULL", (outcome, event_id))

    def outcome(self, event_id: int) -> str | None:
        row = self._one("SELECT outcome FROM events WHERE id = %s", (event_id,))
        return row[0] if row else None

    def node_history(self, node: str, upto_id: int, limit: int = 1000) -> list[tuple[int, FaultEvent, str | None]]:
        rows = self._db.execute("SELECT id, payload, outcome FROM events WHERE node = %s AND id <= %s "
                                "ORDER BY id DESC LIMIT %s", (node, upto_id, limit)).fetchall()
        return [(i, FaultEvent.from_json(p), o) for i, p, o in rows]

    def events(self, node: str | None = None) -> list[tuple[int, FaultEvent, str | None]]:
        sql, args = "SELECT id, payload, outcome FROM events", ()
        if node:
            sql, args = sql + " WHERE node = %s", (node,)
        return [(i, FaultEvent.from_json(p), o) for i, p, o in self._db.execute(sql + " ORDER BY id", args)]

    # remediations ---------------------------------------------------------------
    def record_remediation(self, node: str, action: str, source: str, ref: str, at: float | None = None) -> None:
        self._db.execute("INSERT INTO remediations(node, action, source, ref, at) VALUES (%s, %s, %s, %s, %s) "
                         "ON CONFLICT (source, ref) DO NOTHING",
                         (node, action, source, ref, time.time() if at is None else at))

    def remediations(self, since: float, node: str | None = None) -> list[dict]:
        sql = "SELECT node, action, source, ref, at FROM remediations WHERE at >= %s"
        args: tuple = (since,)
        if node is not None:
            sql, args = sql + " AND node = %s", (since, node)
        return [dict(zip(("node", "action", "source", "ref", "at"), row))
                for row in self._db.execute(sql + " ORDER BY at, id", args)]

    # node states ------------------------------------------------------------
    def node_state(self, node: str) -> str:
        row = self._one("SELECT state FROM node_state WHERE node = %s", (node,))
        return row[0] if row else "in_service"

    def set_node_state(self, node: str, state: str, reason: str, actor: str) -> None:
        self._db.execute(
            "INSERT INTO node_state(node, state, reason, actor, updated_at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (node) DO UPDATE SET state = excluded.state, reason = excluded.reason, "
            "actor = excluded.actor, updated_at = excluded.updated_at", (node, state, reason, actor, time.time()))

    def nodes_in_state(self, *states: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT node FROM node_state WHERE state = ANY(%s)", (list(states),))]

    # small durable settings ---------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM kv WHERE key = %s", (key,))
        return row[0] if row else default

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key = %s", (key,))

    def put(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO kv(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = "
                         "excluded.value", (key, value))




def _pyformat(sql: str) -> str:
    # The SQL handed over is aidc's own, with no '%' and no '?' inside its literals.
    return sql.replace("?", "%s")


class QmarkConnection:
    """A psycopg connection that runs SQL written for sqlite3 (`?` placeholders), so that code
    shared by both backends (aidc.runbook.state, aidc.audit.log) keeps one text per query."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, args=()):
        return self.conn.execute(_pyformat(sql), tuple(args) or None)

    def executemany(self, sql: str, rows) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_pyformat(sql), list(rows))

    def close(self) -> None:
        self.conn.close()


def display_name(dsn: str) -> str:
    """How a state database is named in messages: `postgres:DBNAME` (never a password)."""
    psycopg = _psycopg()
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:  # a malformed DSN: connect() reports it
        return "postgres:(state database)"
    return f"postgres:{params.get('dbname') or params.get('user') or '(default database)'}"


def require_schema(conn, version: int, what: str) -> None:
    """Refuse a database not migrated to at least `version` (read-only openers never migrate)."""
    if conn.execute("SELECT to_regclass('aidc_schema_version')").fetchone()[0] is None:
        raise StateError(f"the state database holds no aidc state (no schema version): {what} is not there")
    current = conn.execute("SELECT max(version) FROM aidc_schema_version").fetchone()[0] or 0
    if current < version:
        raise StateError(f"the state database is at schema version {current}: {what} needs {version} "
                         "(start a writer, or `aidc state migrate`, to bring it up)")


@dataclass(frozen=True)
class _Postgres:
    name: str = "postgres"

    def open_event_store(self, location: str) -> PostgresStore:
        return PostgresStore(location)

    def open_audit_log(self, location: str, *, read_only: bool = False, signer=None, state_dir=None):
        from aidc.audit.postgres import PostgresAuditLog

        return PostgresAuditLog(location, read_only=read_only, signer=signer, state_dir=state_dir)

    def open_run_state(self, location: str):
        from aidc.runbook.state_postgres import PostgresRunState

        return PostgresRunState(location)


BACKEND = _Postgres()
