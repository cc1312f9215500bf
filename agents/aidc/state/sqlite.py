"""The embedded state backend: SQLite files on the controller's host (aidc.store.Store, the
audit log aidc.audit.log.AuditLog with its anchor file, aidc.runbook.state.RunState)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class _Sqlite:
    name: str = "sqlite"

    def open_event_store(self, location: str):
        from aidc.store import Store

        return Store(location)


    def open_audit_log(self, location: str, *, read_only: bool = False, signer=None, state_dir=None):
        # state_dir: a SQLite log's installation record is the one in its own directory.
        from aidc.audit.log import AuditLog

        return AuditLog(location, read_only=read_only, signer=signer)

    def open_run_state(self, location: str):
        from aidc.runbook.state import RunState

        return RunState(location)


BACKEND = _Sqlite()
