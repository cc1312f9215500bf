"""Move a site's event store from SQLite to PostgreSQL (`aidc state migrate`).

Everything moves as it is: event ids and keys (a key names its id, and remediations name events
by id), decisions, node states, remediation history, settings, and the store id, so events
appended after the move never reuse a key. The copy is one PostgreSQL transaction, verified row
by row against the source before it commits: a crash or a mismatch leaves the destination as it
was, and the command can simply run again. A destination that already holds state is refused.
Stop the controller first: the source is read in one snapshot, and what it writes afterwards
stays behind.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from aidc.errors import StateError

# Table -> columns, primary key first (the order rows are compared in).
TABLES = {
    "events": ("id", "node", "payload", "created_at", "handled_at", "outcome", "key", "forwarded_at"),
    "node_state": ("node", "state", "reason", "actor", "updated_at"),
    "remediations": ("id", "node", "action", "source", "ref", "at"),
    "kv": ("key", "value"),
}
SERIALS = {"events": "events_id_seq", "remediations": "remediations_id_seq"}


def _read_source(path: Path) -> dict[str, list[tuple]]:
    if not path.is_file():
        raise StateError(f"no SQLite store at {path}")
    from aidc.store import Store

    Store(path).close()  # bring an older store to today's columns and keys, as the controller would
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("BEGIN")  # one snapshot of all four tables
        return {t: [tuple(r) for r in db.execute(f"SELECT {', '.join(c)} FROM {t} ORDER BY {c[0]}")]
                for t, c in TABLES.items()}
    finally:
        db.close()


def _occupied(conn) -> list[str]:
    """What the destination already holds, besides a store id made by merely opening it."""
    held = []
    for table in TABLES:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            continue
        where = " WHERE key <> 'store.id'" if table == "kv" else ""
        if conn.execute(f"SELECT count(*) FROM {table}{where}").fetchone()[0]:
            held.append(table)
    return held


def migrate_event_store(sqlite_path: str | Path, dsn: str, dry_run: bool = False) -> dict:
    """Copy the SQLite event store at `sqlite_path` into the PostgreSQL database `dsn`; returns
    {"rows": {table: count}, "dry_run": ...}."""
    from aidc.state.postgres import connect, migrate

    rows = _read_source(Path(sqlite_path))
    summary = {"from": f"sqlite:{sqlite_path}", "rows": {t: len(r) for t, r in rows.items()}, "dry_run": dry_run}
    with connect(dsn) as conn:
        held = _occupied(conn)
        if held:
            raise StateError(f"the destination already holds state ({', '.join(held)}): a site moves once, "
                             "into an empty database")
        if dry_run:
            return summary
        summary["schema_version"] = migrate(conn)
        with conn.transaction():
            conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN EXCLUSIVE MODE")  # no replica writes meanwhile
            if _occupied(conn):
                raise StateError("the destination took state while this migration started: run it again")
            conn.execute("DELETE FROM kv WHERE key = 'store.id'")  # the source's store id replaces it
            for table, columns in TABLES.items():
                with conn.cursor() as cur:
                    cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                    f"({', '.join(['%s'] * len(columns))})", rows[table])
            for table, sequence in SERIALS.items():
                if rows[table]:
                    conn.execute("SELECT setval(%s, %s)", (sequence, max(r[0] for r in rows[table])))
            for table, columns in TABLES.items():
                copied = [tuple(r) for r in conn.execute(
                    f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}")]
                if copied != rows[table]:
                    raise StateError(f"verification failed: {table} differs after the copy; nothing was written")
    return summary
