"""The embedded state backend: SQLite files on the controller's host (aidc.store.Store)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class _Sqlite:
    name: str = "sqlite"

    def open_event_store(self, location: str):
        from aidc.store import Store

        return Store(location)


BACKEND = _Sqlite()
