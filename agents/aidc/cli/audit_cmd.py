"""`aidc audit`: verify the hash chain and write reports."""

from __future__ import annotations

from pathlib import Path

import typer

from aidc.cli.options import (StateLocation, VocabularyGroup, audit_db_option, audit_db_path, stack_option,
                              state_dir_option, state_option)

from aidc.audit import AuditLog
from aidc.cli.output import JSON_OPTION, emit, timestamp
from aidc.errors import AuditError
from aidc.strict_json import finite

app = typer.Typer(cls=VocabularyGroup, help="Verify the tamper-evident audit log and write reports.", no_args_is_help=True)

DB_OPTION = audit_db_option(None, "Audit database (SQLite; default: STATE_DIR/audit.db, the lab's when "
                                  "no state directory is named and .aidc/lab holds a lab). With --state "
                                  "postgres:DSN or a postgres --stack, its directory is the state directory "
                                  "whose installation record names the signing key.")
STATE_DIR_OPTION = state_dir_option()
STATE_OPTION = state_option("The audit log (postgres: the state database holding it, not --audit-db; sqlite: "
                            "PATH is the log's file, as --audit-db).")
STACK_OPTION = stack_option("Read the log where this stack's `state:` keeps it (SQLite: --audit-db; "
                            "postgres: its dsn, dsn_file or dsn_env).")


def _db(db: Path | None, state_dir: Path | None, state: StateLocation | None) -> Path:
    """The SQLite log (or, with a PostgreSQL log, the state directory's audit.db beside its
    installation record): --state sqlite:PATH, --audit-db, or STATE_DIR/audit.db."""
    if state is not None and state.backend == "sqlite":
        if db is not None:
            raise AuditError("--audit-db and --state sqlite:PATH both name the audit log: give one")
        return Path(state.location)
    return audit_db_path(db, state_dir)


def _postgres_dsn(state: StateLocation | None, stack: str | None) -> str | None:
    """The PostgreSQL database holding the log, or None for the SQLite file --db. --state
    overrides the stack's `state:`."""
    if state is not None:
        return state.location if state.backend == "postgres" else None
    if stack is None:
        return None
    from aidc.spec import load_stack
    from aidc.state import resolve_dsn

    state = load_stack(stack).state
    return resolve_dsn(state) if state.backend == "postgres" else None


def _open(db: Path, state: StateLocation | None = None, stack: str | None = None, read_only: bool = True) -> AuditLog:
    # Read-only: reading a log never changes it, and another program's file is refused, not converted.
    location = _postgres_dsn(state, stack)
    if location is None:
        return AuditLog(db, read_only=read_only)
    from aidc.audit.log import configured_signer
    from aidc.state import open_audit_log

    return open_audit_log("postgres", location, read_only=read_only, state_dir=db.parent,
                          signer=None if read_only else configured_signer(db))


def read_public_key(path: Path) -> str:
    """The PEM text of a public key file (checked when it is used); one clear error when unreadable."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"--public-key {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


PUBLIC_KEY_OPTION = typer.Option(None, "--public-key", help="Signing public key (PEM file, from `aidc kms "
                                 "public-key`): also require a signed anchor and signed records. The key "
                                 "the installation recorded beside the log (installation.json) is required "
                                 "in any case.")


@app.command("verify")
def verify(db: Path = DB_OPTION, state_dir: Path = STATE_DIR_OPTION, public_key: Path = PUBLIC_KEY_OPTION,
           state: StateLocation = STATE_OPTION, stack: str = STACK_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Check every record's hash, the chain and the anchor (and signatures with the installation's key
    and --public-key); exit 1 naming the first bad record."""
    db = _db(db, state_dir, state)
    pem = read_public_key(public_key) if public_key is not None else None
    with _open(db, state, stack) as log:
        result = log.verify(public_key_pem=pem)
    what = "chain intact, anchor and records signed" if result.signed else "chain intact"
    text = (f"{log.path}: OK, {result.records} records, {what}" if result.ok
            else f"{log.path}: FAILED{result.failure}")
    text += "".join(f"\n  note: {n}" for n in result.notes)
    emit(result.to_dict(), as_json, text)
    if not result.ok:
        raise typer.Exit(1)


@app.command("reanchor")
def reanchor(reason: str = typer.Option(..., "--reason", help="Why the log is accepted as it stands (recorded)."),
             db: Path = DB_OPTION, state_dir: Path = STATE_DIR_OPTION, state: StateLocation = STATE_OPTION,
             stack: str = STACK_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Accept a log whose anchor is missing, damaged or ahead of it: record the gap and anchor it again."""
    db = _db(db, state_dir, state)
    import getpass

    from aidc.audit.log import default_actor

    on_postgres = _postgres_dsn(state, stack) is not None
    if not on_postgres and not db.is_file():
        raise AuditError(f"no audit database at {db}")
    _open(db, state, stack).close()  # another program's file is refused before anything is written
    with _open(db, state, stack, read_only=False) as log:
        record = log.reanchor(reason, actor=default_actor(f"reanchor:{getpass.getuser()}"))
    emit({"seq": record.seq, "hash": record.hash, **record.payload}, as_json,
         f"{log.path}: re-anchored at record {record.seq} ({record.payload['problem']})")


@app.command("show")
def show(db: Path = DB_OPTION, state_dir: Path = STATE_DIR_OPTION,
         node: str = typer.Option(None, help="Only this node."),
         kind: str = typer.Option(None, help="Only this kind of record."), state: StateLocation = STATE_OPTION,
         stack: str = STACK_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List audit records."""
    db = _db(db, state_dir, state)
    with _open(db, state, stack) as log:
        recs = log.records(kind=kind, node=node)
    data = finite([{**r.__dict__, "dry_run": r.dry_run} for r in recs])  # an old NaN prints as "NaN"
    text = "\n".join(f"{r.seq:5d} {timestamp(r.ts)} {r.kind:22s} {r.node or '-':12s} {r.actor:28s} "
                     f"{'[dry-run] ' if r.dry_run else ''}{r.reason}" for r in recs)
    emit(data, as_json, text or "(no records)")


@app.command("report")
def report(db: Path = DB_OPTION, state_dir: Path = STATE_DIR_OPTION,
           out: Path = typer.Option(Path(".aidc/report"), "--out", help="Output directory."),
           state: StateLocation = STATE_OPTION, stack: str = STACK_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Write report.html (verdict, failover timeline, burn-in, collectives, goodput, records) and report.json."""
    db = _db(db, state_dir, state)
    from aidc.audit.report import write_report

    with _open(db, state, stack) as log:
        html_path, json_path, _ = write_report(log, out)
    emit({"html": str(html_path), "json": str(json_path)}, as_json, f"wrote {html_path} and {json_path}")
