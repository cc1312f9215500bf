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
    audit_from: str = typer.Option(None, "--audit-from", help="sqlite:PATH, the audit log (default: audit.db beside "
                                   "the event store, when there is one). It must verify, or nothing moves."),
    runbook_from: str = typer.Option(None, "--runbook-from", help="sqlite:PATH, the runbook engine's run state "
                                     "(`aidc runbook serve --state sqlite:PATH`; stop the engine first)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would move and check the source audit log "
                                 "and the destination; write nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Move the event store (events, node states, remediation history, breaker and escalation
    settings), the audit log (records, signatures, anchor) and the runbook run state into an empty
    PostgreSQL database in one transaction, verified row by row before it commits; then verify
    the audit chain as PostgreSQL holds it. A database that already holds state is refused."""
    from aidc.state.migrate import migrate_state

    summary = migrate_state(
        _location(source, "sqlite", "--from"), _location(target, "postgres", "--to"), dry_run=dry_run,
        audit_path=_location(audit_from, "sqlite", "--audit-from") if audit_from else None,
        run_state_path=_location(runbook_from, "sqlite", "--runbook-from") if runbook_from else None)
    counts = ", ".join(f"{n} {t}" for t, n in summary["rows"].items())
    text = ("would move " if dry_run else "moved ") + f"{' and '.join(summary['moved'])}: {counts}"
    verified = summary.get("audit_verified")
    if verified is not None:
        text += f"\naudit log verified in PostgreSQL: {verified['records']} records, chain intact"
    emit(summary, as_json, text)
