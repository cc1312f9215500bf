"""Where the controller and the runbook engine keep their state, by backend name (`state.backend`
in the stack file): `sqlite`, the embedded default (one host), or `postgres` (15+, through
psycopg 3), shared by every controller replica.

Backends are registered by name here, each a module holding `BACKEND` (see base.StateBackend);
a module is imported only when its backend is used, so SQLite sites need no psycopg. This
release puts the failover event store (events by key, node states, remediation history, the
key/value settings the breaker latch and escalation keep), the audit log (hash chain,
signatures, the anchor) and the runbook engine's runs and steps on either backend.
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


def open_audit_log(backend: str, location: str | os.PathLike, *, read_only: bool = False, signer=None,
                   state_dir: str | os.PathLike | None = None):
    """The audit log at `location`: a SQLite file path (its anchor file beside it), or a DSN."""
    return backend_for(backend).open_audit_log(str(location), read_only=read_only, signer=signer,
                                               state_dir=state_dir)


def open_run_state(backend: str, location: str | os.PathLike):
    """The runbook engine's run state at `location`: a SQLite file path, or a DSN."""
    return backend_for(backend).open_run_state(str(location))


def audit_log_for(state, sqlite_path: str | os.PathLike, *, read_only: bool = False, signer=None):
    """The audit log a stack's `state:` section names; SQLite keeps using `sqlite_path`, and a
    PostgreSQL log takes its signing sidecar (`<sqlite_path>.signing`) and installation record
    from beside that path (the state directory), as the SQLite log there would."""
    if state.backend == "sqlite":
        return open_audit_log("sqlite", sqlite_path, read_only=read_only, signer=signer)
    if signer is None and not read_only:
        from aidc.audit.log import configured_signer

        signer = configured_signer(sqlite_path)  # the keyring the state directory's sidecar names
    return open_audit_log(state.backend, resolve_dsn(state), read_only=read_only, signer=signer,
                          state_dir=os.path.dirname(os.path.abspath(sqlite_path)))


def run_state_for(state, sqlite_path: str | os.PathLike):
    """The run state a stack's `state:` section names; SQLite keeps using `sqlite_path`."""
    if state.backend == "sqlite":
        return open_run_state("sqlite", sqlite_path)
    return open_run_state(state.backend, resolve_dsn(state))
