"""The runbook engine's run state on PostgreSQL (`state.backend: postgres`): the tables of
migration 0003_runbook_state, shared by every engine replica, with RunState's SQL unchanged.

SQLite's `BEGIN IMMEDIATE` takes the database's one write lock for the whole transaction, and
RunState's read-then-write transactions (claim a run, take a node's lock, mark an alert seen)
rely on it. Here a transaction-scoped advisory lock plays that part: runbook transactions run
one at a time across hosts, and reads outside a transaction are plain autocommit reads.
"""

from __future__ import annotations

import contextlib
import threading

from aidc.runbook.state import RunState

# pg_advisory_xact_lock key for run-state transactions: the same number in every replica.
WRITE_LOCK = 0x61696463_72756e73  # "aidcruns"
SCHEMA_VERSION = 3  # migration 0003_runbook_state


class PostgresRunState(RunState):
    def __init__(self, dsn: str):
        from aidc.state.postgres import display_name

        self.dsn = dsn
        self.path = display_name(dsn)
        self._local = threading.local()
        self.db  # noqa: B018 -- connects and migrates now: an unreachable database is an error at start

    def _connect(self):
        from aidc.state.postgres import QmarkConnection, connect, migrate

        conn = connect(self.dsn)
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return QmarkConnection(conn)

    @contextlib.contextmanager
    def transaction(self):
        db = self.db
        with db.conn.transaction():
            db.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
            yield db
