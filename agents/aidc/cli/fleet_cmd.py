"""`aidc fleet`: the fleet-health figure, and the health API's thin clients."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from aidc.cli import options as vocabulary
from aidc.cli.output import JSON_OPTION, emit

app = typer.Typer(cls=vocabulary.VocabularyGroup, help="Is the fleet good? The fleet-health figure (now, at a past time, before/after) "
                       "and the controller's health API (nodes, one node, one GPU).", no_args_is_help=True)

STACK = vocabulary.stack_option("Stack file: its node pools are the installed GPU capacity; `lab` only when the "
                                 "state directory is the lab's.")
STATE_DIR = vocabulary.state_dir_option(help="State directory holding the audit log (audit.db); .aidc/lab only "
                                             "for the lab stack.")
URL = typer.Option(..., "--url", envvar="AIDC_HEALTH_URL",
                   help="The controller's listener, https://HOST:PORT (`aidc failover run --listen`).")
CERT = typer.Option(..., "--tls-cert", help="Client certificate (PEM) of the listener's client CA.")
KEY = typer.Option(..., "--tls-key", help="Its private key (PEM).")
CA = typer.Option(..., "--ca", help="CA certificate (PEM) that signed the controller's server certificate.")
TOKEN_FILE = typer.Option(None, "--token-file",
                          help="A file holding a bearer token of the listener's --api-token-map (adds token:<name> "
                               "to the certificate's identity); or set $AIDC_HEALTH_TOKEN.")


def _text(answer: dict) -> str:
    lines = [f"fleet health at {answer['at_utc']}: {_ratio(answer['fleet'])} "
             f"(rules {answer['rules_version']}, audit record {answer['audit_seq']})"]
    for name, capacity in answer["pools"].items():
        lines.append(f"  pool {name}: {_ratio(capacity)}")
    if answer.get("goodput"):
        lines.append(f"  goodput: job {answer['goodput']['job']} ETTR {answer['goodput']['ettr']:.3f}")
    return "\n".join(lines)


def _ratio(c: dict) -> str:
    ratio = "n/a" if c["healthy_gpu_ratio"] is None else f"{c['healthy_gpu_ratio']:.1%}"
    return (f"{ratio} healthy ({c['healthy_gpus']} of {c['installed_gpus']} GPUs installed; "
            f"{c['certified_gpus']} certified, {c['in_service_gpus']} in service)")


def _compare_text(result: dict) -> str:
    lines = ["before: " + _text(result["before"]), "after:  " + _text(result["after"])]
    for change in result["changes"]:
        ratio = change["fleet_ratio"]
        lines.append(f"  {change['at_utc']}  {change['kind']:<20} {change['node'] or '-':<14} "
                     f"-> fleet {'n/a' if ratio is None else f'{ratio:.1%}'}  ({change['reason']})")
    delta = result["delta"]["fleet"]["healthy_gpu_ratio"]
    lines.append(f"change: {'n/a' if delta is None else f'{delta:+.1%}'}; lowest "
                 f"{'n/a' if result['lowest_fleet_ratio'] is None else format(result['lowest_fleet_ratio'], '.1%')}"
                 f"; dropped: {'yes' if result['dropped'] else 'no'}, recovered: "
                 f"{'yes' if result['recovered'] else 'no'}")
    return "\n".join(lines)


@app.command("health")
def health(pool: Optional[str] = typer.Option(None, "--pool", help="One pool only (the fleet total stays)."),
           at: Optional[str] = typer.Option(None, "--at", help="A past time (Unix seconds or ISO 8601, UTC when "
                                            "no offset): the figure as the audit log stood then."),
           compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", metavar="T1 T2",
                                                             help="Before and after (an upgrade window): both "
                                                                  "figures, the change, and every move in between."),
           stack: str = STACK, state_dir: Path = STATE_DIR,
           audit_db: Optional[Path] = vocabulary.audit_db_option(None, "Audit log (default STATE_DIR/audit.db)."),
           as_json: bool = JSON_OPTION) -> None:
    """The fleet-health figure: certified, in-service GPUs over installed GPUs, per pool and for
    the fleet, replayed from the audit log (so a past answer is the same whenever it is asked).
    See docs/architecture.md, "The fleet-health figure"."""
    from aidc.audit.log import AuditLog
    from aidc.errors import AidcError
    from aidc.fleet.figure import Rules, audit_records, check_pool, compare as compare_figures, figure_at, \
        parse_instant
    from aidc.spec import load_stack

    if at is not None and compare is not None:
        raise typer.BadParameter("give --at or --compare, not both", param_hint="--at")
    stack, state_dir = vocabulary.resolve_stack_and_state_dir(stack, state_dir)
    spec = load_stack(stack)
    check_pool(spec, pool)
    times = [parse_instant(t) for t in compare] if compare else [parse_instant(at) if at else time.time()]
    db = audit_db or state_dir / "audit.db"
    rules = Rules.shipped()
    try:
        with AuditLog(db, read_only=True) as log:
            records = audit_records(log, rules)
    except AidcError as exc:
        raise AidcError(f"{exc} (the figure is replayed from the audit log: --state-dir or --audit-db)") from None
    if compare:
        result = compare_figures(spec, records, times[0], times[1], pool, rules)
        emit(result, as_json, _compare_text(result))
    else:
        answer = figure_at(spec, records, times[0], pool, rules)
        emit(answer, as_json, _text(answer))


def _client(url: str, cert: Path, key: Path, ca: Path, token_file: Path | None):
    from aidc.errors import AidcError
    from aidc.fleet.client import HealthClient
    from aidc.transport.forwarder import ClientTLS

    token = os.environ.get("AIDC_HEALTH_TOKEN") or None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise AidcError(f"--token-file {token_file}: cannot read it ({exc.strerror})") from None
    return HealthClient(url, ClientTLS(cert, key, ca), token)


def _offender_text(mark: dict | None) -> str:
    return "no" if mark is None else f"{mark['target']} marked for {mark['state']} ({mark['reason']})"


def _node_line(n: dict) -> str:
    return (f"{n['node']:<16} {n['pool']:<10} {n['health']:<12} {n['healthy_gpus']}/{n['installed_gpus']} GPUs "
            f"healthy, scheduler {n['scheduler_state']}, {n['open_events'] if isinstance(n['open_events'], int) else len(n['open_events'])} open event(s)")


@app.command("nodes")
def nodes(url: str = URL, tls_cert: Path = CERT, tls_key: Path = KEY, ca: Path = CA,
          token_file: Optional[Path] = TOKEN_FILE, as_json: bool = JSON_OPTION) -> None:
    """Every node's health (GET /v1/nodes of the health API)."""
    listed = _client(url, tls_cert, tls_key, ca, token_file).nodes()
    emit({"nodes": listed}, as_json, "\n".join(_node_line(n) for n in listed))


@app.command("node")
def node(name: str = typer.Argument(..., help="Node name."), url: str = URL, tls_cert: Path = CERT,
         tls_key: Path = KEY, ca: Path = CA, token_file: Optional[Path] = TOKEN_FILE,
         as_json: bool = JSON_OPTION) -> None:
    """One node: GPUs, open events, quarantine (who, why), last signed certificate (GET /v1/nodes/NODE)."""
    answer = _client(url, tls_cert, tls_key, ca, token_file).node(name)
    lines = [_node_line(answer)]
    if answer["quarantine"]:
        q = answer["quarantine"]
        lines.append(f"  quarantined by {q['by']}: {q['reason']}")
    lines += [f"  gpu {g['index']}: {g['health']}" for g in answer["gpu_health"]]
    lines += [f"  open: {e['kind']} {e['message']} ({e['outcome'] or 'undecided'})" for e in answer["open_events"]]
    lines.append("  certificate: " + (f"{answer['certificate']['verdict']}, signed by key "
                                      f"{answer['certificate']['signature']['key_id']}" if answer["certificate"]
                                      else f"none ({answer['certificate_missing']})"))
    emit(answer, as_json, "\n".join(lines))


@app.command("gpu")
def gpu(name: str = typer.Argument(..., help="Node name."),
        index: int = typer.Argument(..., min=0, help="GPU index on the node."), url: str = URL,
        tls_cert: Path = CERT, tls_key: Path = KEY, ca: Path = CA, token_file: Optional[Path] = TOKEN_FILE,
        as_json: bool = JSON_OPTION) -> None:
    """One GPU (GET /v1/nodes/NODE/gpus/INDEX)."""
    answer = _client(url, tls_cert, tls_key, ca, token_file).gpu(name, index)
    text = (f"{name} gpu {index}: {answer['health']} (certified: {answer['certified']}, in service: "
            f"{answer['in_service']}), {len(answer['open_events'])} open event(s), repeat offender: "
            f"{_offender_text(answer['repeat_offender'])}")
    emit(answer, as_json, text)
