"""Move a site's state from SQLite to PostgreSQL (`aidc state migrate`).

Everything moves as it is: the event store (event ids and keys, since a key names its id and
remediations name events by id; decisions, node states, remediation history, settings, and the
store id, so events appended after the move never reuse a key), the audit log (records, their
hashes and signatures, and the anchor, its signature included: the signed messages are the
same on both backends), and the runbook engine's runs, steps, node locks, alerts seen and
approvals (run ids kept: audit records name runs by id).

The source audit log must verify before anything moves (a broken chain is for a person to
re-anchor or explain first, not to carry over). The copy is one PostgreSQL transaction,
compared row by row with the source and the copied chain walked before it commits: a crash or
a mismatch leaves the destination as it was, and the command can simply run again. After the
commit the log is opened from PostgreSQL and verified as `aidc audit verify` would (signatures
and the installation's key included). A destination that already holds state is refused: a
site moves once, into an empty database. Stop the controller and the runbook engine first:
each source is read in one snapshot, and what they write afterwards stays behind.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from aidc.errors import StateError

# What moves, by part: table -> columns (the primary key first).
EVENT_STORE = {
    "events": ("id", "node", "payload", "created_at", "handled_at", "outcome", "key", "forwarded_at"),
    "node_state": ("node", "state", "reason", "actor", "updated_at"),
    "remediations": ("id", "node", "action", "source", "ref", "at"),
    "kv": ("key", "value"),
}
RUNBOOK_STATE = {
    "runs": ("id", "runbook", "node", "status", "trigger", "owner", "error", "created_at", "updated_at",
             "finished_at"),
    "steps": ("run_id", "idx", "step_id", "kind", "phase", "status", "attempts", "started_at", "finished_at",
              "result"),
    "node_locks": ("node", "run_id", "acquired_at"),
    "alerts_seen": ("fingerprint", "starts_at", "run_id", "first_seen", "repeats"),
    "approvals": ("run_id", "idx", "approved_by", "approved_at"),
}
AUDIT_LOG = {
    "audit": ("seq", "ts", "actor", "node", "kind", "reason", "payload", "prev_hash", "hash"),
    "audit_signature": ("seq", "key_id", "key_version", "signature", "algorithm"),
}
TABLES = {**EVENT_STORE, **RUNBOOK_STATE, **AUDIT_LOG}
SERIALS = {"events": "events_id_seq", "remediations": "remediations_id_seq", "runs": "runs_id_seq"}
# What merely opening a database makes, and a migration replaces: the store id, the genesis anchor.
MADE_BY_OPENING = {"kv": " WHERE key <> 'store.id'", "audit_anchor": " WHERE seq <> 0"}


def _snapshot(path: Path, tables: dict[str, tuple[str, ...]]) -> dict[str, list[tuple]]:
    """Every row of `tables` in one read transaction (a table the file lacks is empty)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("BEGIN")
        present = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = {}
        for table, columns in tables.items():
            if table not in present:
                rows[table] = []
                continue
            # A column an older file lacks reads as NULL (audit_signature.algorithm: Ed25519).
            has = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            listed = ", ".join(c if c in has else "NULL" for c in columns)
            rows[table] = [tuple(r) for r in db.execute(f"SELECT {listed} FROM {table}")]
        return rows
    finally:
        db.close()


def _read_event_store(path: Path) -> dict[str, list[tuple]]:
    if not path.is_file():
        raise StateError(f"no SQLite store at {path}")
    from aidc.store import Store

    Store(path).close()  # bring an older store to today's columns and keys, as the controller would
    return _snapshot(path, EVENT_STORE)


def _read_run_state(path: Path) -> dict[str, list[tuple]]:
    if not path.is_file():
        raise StateError(f"no runbook run state at {path}")
    from aidc.runbook.state import RunState

    RunState(path).close()  # an older file gets today's tables, as the engine would give it
    return _snapshot(path, RUNBOOK_STATE)


def _read_audit_log(path: Path) -> tuple[dict[str, list[tuple]], object, dict]:
    """(rows, anchor, verification) of a SQLite audit log that verifies; StateError otherwise."""
    from aidc.audit.log import AuditLog
    from aidc.errors import AuditError

    if not path.is_file():
        raise StateError(f"no audit log at {path}")
    try:
        with AuditLog(path, read_only=True) as log:
            result = log.verify()
            anchor = log._read_anchor()
            rows = _snapshot(path, AUDIT_LOG)
            # The anchor is written after its record commits: read after the rows, it may name a
            # record they lack only if a writer is still running.
            if anchor is not None and anchor.seq > len(rows["audit"]):
                raise StateError(f"{path} is still being written (its anchor is ahead of the rows read): "
                                 "stop every writer first")
    except AuditError as exc:
        raise StateError(str(exc)) from None
    if not result.ok:
        raise StateError(f"the audit log {path} does not verify{result.failure}; nothing was moved (a person "
                         f"re-anchors or explains it first: `aidc audit verify --db {path}`)")
    return rows, anchor, result.to_dict()


def _occupied(conn) -> list[str]:
    """What the destination already holds, besides what merely opening it makes."""
    held = []
    for table in [*TABLES, "audit_anchor"]:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            continue
        if conn.execute(f"SELECT count(*) FROM {table}{MADE_BY_OPENING.get(table, '')}").fetchone()[0]:
            held.append(table)
    return held


def _same_rows(a: list[tuple], b: list[tuple]) -> bool:
    # Compared as sets, not in an ORDER BY: text sorts by collation in PostgreSQL, by bytes in SQLite.
    return len(a) == len(b) and set(a) == set(b)


def migrate_state(sqlite_path: str | Path, dsn: str, dry_run: bool = False, *, audit_path: str | Path | None = None,
                  run_state_path: str | Path | None = None) -> dict:
    """Copy the SQLite event store at `sqlite_path`, and the audit log (`audit_path`; default:
    audit.db beside the store, when there is one) and the runbook run state (`run_state_path`,
    when given) into the PostgreSQL database `dsn`. Returns {"rows": {table: count}, "moved":
    [parts], "audit_verified": VerifyResult dict, "dry_run": ...}."""
    from aidc.state.postgres import connect, migrate

    store_path = Path(sqlite_path)
    if audit_path is None and store_path.with_name("audit.db").is_file():
        audit_path = store_path.with_name("audit.db")
    rows = _read_event_store(store_path)
    moved, anchor = ["event store"], None
    summary: dict = {"from": f"sqlite:{sqlite_path}", "dry_run": dry_run}
    if audit_path is not None:
        audit_rows, anchor, source_check = _read_audit_log(Path(audit_path))
        rows.update(audit_rows)
        moved.append("audit log")
        summary["audit_from"] = str(audit_path)
        summary["audit_source_verified"] = source_check
    if run_state_path is not None:
        rows.update(_read_run_state(Path(run_state_path)))
        moved.append("runbook state")
        summary["runbook_from"] = str(run_state_path)
    summary.update(moved=moved, rows={t: len(r) for t, r in rows.items()})
    with connect(dsn) as conn:
        held = _occupied(conn)
        if held:
            raise StateError(f"the destination already holds state ({', '.join(held)}): a site moves once, "
                             "into an empty database")
        if dry_run:
            return summary
        summary["schema_version"] = migrate(conn)
        with conn.transaction():
            conn.execute(f"LOCK TABLE {', '.join([*TABLES, 'audit_anchor'])} IN EXCLUSIVE MODE")  # no replica writes
            if _occupied(conn):
                raise StateError("the destination took state while this migration started: run it again")
            conn.execute("DELETE FROM kv WHERE key = 'store.id'")  # the source's store id replaces it
            for table, source_rows in rows.items():
                columns = TABLES[table]
                with conn.cursor() as cur:
                    cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                    f"({', '.join(['%s'] * len(columns))})", source_rows)
            for table, sequence in SERIALS.items():
                if rows.get(table):
                    conn.execute("SELECT setval(%s, %s)", (sequence, max(r[0] for r in rows[table])))
            if anchor is not None:
                _copy_anchor(conn, anchor)
            for table, source_rows in rows.items():
                copied = [tuple(r) for r in conn.execute(f"SELECT {', '.join(TABLES[table])} FROM {table}")]
                if not _same_rows(copied, source_rows):
                    raise StateError(f"verification failed: {table} differs after the copy; nothing was written")
            if "audit" in rows:
                _check_copied_chain(conn)
    if audit_path is not None:
        summary["audit_verified"] = _verify_moved_log(dsn, Path(audit_path).parent)
    return summary


def _copy_anchor(conn, anchor) -> None:
    import json

    conn.execute("DELETE FROM audit_anchor")  # a genesis anchor made by merely opening the database
    conn.execute("INSERT INTO audit_anchor(id, seq, hash, signature) VALUES (1, %s, %s, %s)",
                 (anchor.seq, anchor.hash, json.dumps(anchor.signature) if anchor.signature else None))


def _check_copied_chain(conn) -> None:
    """Walk the chain as PostgreSQL now holds it, before the commit."""
    from aidc.audit.log import COLUMNS, chain_problem

    copied = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY seq").fetchall()
    broken = chain_problem(copied)
    if broken:
        raise StateError(f"verification failed: the copied audit chain breaks at record {broken[0]} ({broken[1]}); "
                         "nothing was written")


def _verify_moved_log(dsn: str, state_dir: Path) -> dict:
    """`aidc audit verify` on the moved log (the installation's key from the state directory)."""
    from aidc.audit.postgres import PostgresAuditLog

    with PostgresAuditLog(dsn, read_only=True, state_dir=state_dir) as log:
        result = log.verify()
    if not result.ok:
        raise StateError(f"the audit log was moved but does not verify in PostgreSQL{result.failure}")
    return result.to_dict()

