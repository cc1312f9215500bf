"""`aidc health`: read GPU faults out of a kernel log and classify them with the XID catalog."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from aidc.cli.output import JSON_OPTION, emit, emit_lines
from aidc.errors import AidcError

app = typer.Typer(help="GPU fault detection: kernel-log parsing and XID classification.", no_args_is_help=True)


class LogFileError(AidcError):
    """The log file named on the command line cannot be read."""


@app.command("parse-log")
def parse_log(file: Path = typer.Argument(..., help="Kernel log: dmesg, dmesg -T/-r/-x, journald/syslog text or "
                                                    "JSON, or /dev/kmsg records."),
              catalog: Path = typer.Option(None, help="XID catalog file (default: the shipped data/xid_catalog.yaml)."),
              as_json: bool = typer.Option(False, "--json", help="One JSON object per detected event, one per line.")
              ) -> None:
    """Print every GPU fault the kernel logged, with the catalog's action (XID lines, NVSwitch
    SXid lines, and the multi-line fallen-off-the-bus message that has no XID). Lines other
    programs logged are ignored; a driver line that cannot be read is skipped with a warning
    on stderr. Any file content is accepted (invalid UTF-8, NULs, over-long lines)."""
    from aidc.health.catalog import load_catalog
    from aidc.health.kmsg import KernelLogParser, read_lines

    cat = load_catalog(catalog)
    if not file.exists():
        raise LogFileError(f"{file}: no such file")
    if file.is_dir():
        raise LogFileError(f"{file}: is a directory, expected a kernel log file")
    number = 0
    skipped: list[tuple[int, str]] = []
    parser = KernelLogParser(on_unparsed=lambda _line, why: skipped.append((number, why)))
    rows: list[dict] = []
    try:
        with open(file, "rb") as fh:
            for number, line in enumerate(read_lines(fh), 1):
                for fault in parser.feed(line):
                    cls = cat.classify_kernel(fault.kind, fault.xid, fault.message, fault.severity)
                    rows.append({"xid": fault.xid, "pci": fault.pci, "action": cls.action.value,
                                 "kind": fault.kind.value, "reason": cls.reason, "line": fault.line,
                                 "line_number": number, "severity": fault.severity,
                                 "catalog_version": cls.catalog_version})
    except OSError as exc:
        raise LogFileError(f"{file}: cannot read: {exc.strerror}") from None
    _warn_skipped(file, skipped)
    if as_json:
        emit_lines(rows)
        return
    if not rows:
        emit(rows, False, f"no GPU faults in {file}")
        return
    header = f"{'line':>6}  {'kind':<15} {'xid':>4}  {'pci':<13} {'action':<16} reason"
    body = [f"{r['line_number']:>6}  {r['kind']:<15} {'' if r['xid'] is None else r['xid']:>4}  "
            f"{r['pci'] or '-':<13} {r['action']:<16} {r['reason']}" for r in rows]
    emit(rows, False, "\n".join([header, *body, f"{len(rows)} fault(s); catalog {cat.version}"]))


SKIPPED_SHOWN = 10  # unreadable lines named one by one on stderr; the rest are counted


def _warn_skipped(file: Path, skipped: list[tuple[int, str]]) -> None:
    for number, why in skipped[:SKIPPED_SHOWN]:
        typer.echo(f"aidc: warning: {file}:{number}: driver line skipped, cannot read it: {why}", err=True)
    if len(skipped) > SKIPPED_SHOWN:
        typer.echo(f"aidc: warning: {file}: {len(skipped) - SKIPPED_SHOWN} more unreadable driver line(s) skipped",
                   err=True)


@app.command("catalog")
def show_catalog(as_json: bool = JSON_OPTION) -> None:
    """Print the XID catalog in use: its version, source and the action per XID."""
    from aidc.health.catalog import load_catalog

    cat = load_catalog()
    data = {"version": cat.version, "source": cat.source, "unknown_action": cat.unknown_action.value,
            "xids": {str(k): v for k, v in sorted(cat.xids.items())},
            "faults": {k: v.value for k, v in cat.faults.items()}}
    lines = [f"XID catalog {cat.version} ({cat.source.get('name')}); unknown -> {cat.unknown_action.value}"]
    lines += [f"  {code:>4}  {e['action']:<16} {e.get('name', '')}" for code, e in sorted(cat.xids.items())]
    lines += [f"  {k:>18}  {v.value}" for k, v in cat.faults.items()]
    emit(data, as_json, "\n".join(lines))


@app.command("events")
def events(store: Path = typer.Option(..., help="The agent's event store (SQLite)."),
           node: str = typer.Option(None, help="Only this node's events."),
           as_json: bool = JSON_OPTION) -> None:
    """List the fault events the agents emitted, with failover's outcome where handled."""
    from aidc.store import Store

    if not store.exists():
        raise LogFileError(f"{store}: no such event store")
    db = Store(store)
    try:
        rows = [{"id": i, "outcome": outcome, **json.loads(e.to_json())} for i, e, outcome in db.events(node)]
    finally:
        db.close()
    lines = [f"{r['id']:>5}  {r['node']:<12} {r['kind']:<18} {'' if r['xid'] is None else r['xid']:>4}  "
             f"{r['action']:<16} {r['outcome'] or 'pending':<14} {r['message']}" for r in rows]
    emit(rows, as_json, "\n".join(lines) or "no fault events")
