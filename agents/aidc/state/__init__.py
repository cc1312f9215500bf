"""Where the controller and the runbook engine keep their state, by backend name (`state.backend`
in the stack file): `sqlite`, the embedded default (one host), or `postgres` (15+, through
psycopg 3), shared by every controller replica.

Backends are registered by name here, each a module holding `BACKEND` (see base.StateBackend);
a module is imported only when its backend is used, so SQLite sites need no psycopg. This
release puts the failover event store (events by key, node states, remediation history, the
key/value settings the breaker latch and escalation keep) on either backend; runbook runs and
the audit log follow through the same registry.
"""

from __future__ import annotations

import importlib
import os

from aidc.errors import StateError
from aidc.state.base import EventStore, StateBackend

# Backend name -> module holding its `BACKEND`.
_BACKENDS = {"sqlite": "aidc.state.sqlite", "postgres": "aidc.state.postgres"}


def registered_backends() -> list[str]:
    return list(_BACKENDS)


def backend_for(name: str) -> StateBackend:
    module = _BACKENDS.get(name)
    if module is None:
        raise StateError(f"no state backend {name!r} (there are: {', '.join(_BACKENDS)})")
    return importlib.import_module(module).BACKEND


def open_event_store(backend: str, location: str | os.PathLike) -> EventStore:
    """The event store at `location`: a SQLite file path, or a PostgreSQL DSN."""
    return backend_for(backend).open_event_store(str(location))


def resolve_dsn(state) -> str:
    """The PostgreSQL DSN a spec.State names: `dsn` itself, $`dsn_env`, or the first line of the
    0600 file `dsn_file` (these two may carry a password; the stack file may not)."""
    if state.dsn:
        return state.dsn
    from aidc.runbook.notifiers import NotifyError, read_secret

    try:
        return read_secret(state.dsn_env, state.dsn_file, "state.dsn")
    except NotifyError as exc:
        raise StateError(str(exc)) from None


def event_store_for(state, sqlite_path: str | os.PathLike) -> EventStore:
    """The event store a stack's `state:` section names; SQLite keeps using `sqlite_path`."""
    if state.backend == "sqlite":
        return open_event_store("sqlite", sqlite_path)
    return open_event_store(state.backend, resolve_dsn(state))
