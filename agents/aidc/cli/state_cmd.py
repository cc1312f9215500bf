"""`aidc state`: the controller's state backend (aidc.state)."""

from __future__ import annotations

import typer

from aidc.cli.options import VocabularyGroup

from aidc.cli.output import JSON_OPTION, emit
from aidc.errors import StateError

app = typer.Typer(cls=VocabularyGroup, help="The controller's state: SQLite (one host) or PostgreSQL (every replica).",
                  no_args_is_help=True)


def _location(value: str, backend: str, what: str) -> str:
    name, sep, rest = value.partition(":")
    if name != backend or not sep or not rest:
        raise StateError(f"{what} must be {backend}:{'PATH' if backend == 'sqlite' else 'DSN'} (got {name!r}:...)")
    return rest


@app.command("migrate")
def migrate(
    source: str = typer.Option(..., "--from", help="sqlite:PATH, the site's event store (stop the controller first)."),
    target: str = typer.Option(..., "--to", help="postgres:DSN, an empty database (a password: PGPASSWORD or ~/.pgpass, "
                                                 "not the command line)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would move and check the destination; write nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Move the event store (events, node states, remediation history, breaker and escalation
    settings) into PostgreSQL in one transaction, verified row by row before it commits."""
    from aidc.state.migrate import migrate_event_store

    summary = migrate_event_store(_location(source, "sqlite", "--from"), _location(target, "postgres", "--to"),
                                  dry_run=dry_run)
    counts = ", ".join(f"{n} {t}" for t, n in summary["rows"].items())
    emit(summary, as_json, ("would move " if dry_run else "moved ") + counts)
