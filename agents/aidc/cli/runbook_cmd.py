"""`aidc runbook`: list, show, run (or dry-run), approve, render and serve runbooks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import typer

from aidc.cli import config
from aidc.cli import options as vocabulary
from aidc.cli.output import JSON_OPTION, STALL_AFTER_OPTION, emit
from aidc.errors import AidcError
from aidc.identity import authorize, cli_identity, load_token_map
from aidc.nodenames import shown
from aidc.strict_json import finite

app = vocabulary.group(help="Guarded, audited runbooks triggered by Alertmanager or by hand.")

RUNBOOKS = typer.Option(None, "--runbooks", help="Runbook directory (default: runbooks/ or $AIDC_RUNBOOKS).")
STACK = vocabulary.stack_option("Stack name or Pulumi.<stack>.yaml path (nodes, policy, scheduler); `lab` only "
                                 "when the state directory is the lab's.")
LAB_DIR = vocabulary.state_dir_option(help="State directory: the installation record and audit log (lab scheduler: "
                                           "nodes/<node>/); .aidc/lab only for the lab stack.")
RUN_STATE_DB = Path(".aidc/runbook/state.db")
STATE = vocabulary.state_option(f"The durable run state (and, on postgres, the audit log and failover store; "
                                f"sqlite: PATH is the run state file, default {RUN_STATE_DB}).")
State = vocabulary.StateLocation
AUDIT_DB = vocabulary.audit_db_option(None, "Audit log (SQLite; default: STATE_DIR/audit.db).")
PROMETHEUS = typer.Option(None, "--prometheus", help="Prometheus base URL for check steps, e.g. http://127.0.0.1:9090.")
NOTIFY_FILE = typer.Option(None, "--notify-file", help="Append notifications here as JSON lines.")
INVENTORY = typer.Option(None, "--inventory",
                         help="Ansible inventory for playbook steps (default: playbooks/inventory/aidc_spec.sh).")


def _engine(stack, lab_dir, state: State | None, audit_db, runbooks, prometheus=None, notify_file=None,
            inventory=None):
    from aidc.runbook.context import EngineOptions, build_engine

    return build_engine(EngineOptions(stack=stack, lab_dir=lab_dir,
                                      state_db=vocabulary.sqlite_path(state, RUN_STATE_DB),
                                      state=state.spec_state() if state is not None else None, audit_db=audit_db,
                                      runbooks=runbooks, prometheus=prometheus, notify_file=notify_file,
                                      inventory=inventory))


def _trust_installation(engine, stack, lab_dir: Path, identity: str, action: str, node=None, payload=None) -> None:
    """Roles and policy for a privileged action come from the installation recorded in LAB_DIR
    (aidc.installation), never from the caller's --stack: a stack file that disagrees is refused."""
    from aidc.installation import require
    from aidc.spec import load_stack

    installed = require(lab_dir, load_stack(stack), stack, identity, action, engine.audit, node, payload)
    engine.access_roles = installed.roles


def _catalog(runbooks):
    from aidc.runbook.catalog import Catalog

    return Catalog.load(runbooks)


@app.command("list")
def list_cmd(runbooks: Path = RUNBOOKS, as_json: bool = JSON_OPTION) -> None:
    """List the runbooks (each is validated against the schema on load)."""
    cat = _catalog(runbooks)
    data = [{"name": n, "title": cat.get(n).title, "steps": len(cat.get(n).steps),
             "alerts": [a["alertname"] for a in cat.get(n).trigger.get("alerts", [])],
             "faults": cat.get(n).trigger.get("faults", [])} for n in cat.names()]
    text = "\n".join(f"{d['name']:28s} {d['title']}" for d in data)
    emit(data, as_json, text or "(no runbooks)")


@app.command("show")
def show(name: str = typer.Argument(..., help="Runbook name."), runbooks: Path = RUNBOOKS,
         as_json: bool = JSON_OPTION) -> None:
    """Show one runbook: trigger, guards, steps."""
    from aidc.runbook.render import render_markdown

    rb = _catalog(runbooks).get(name)
    emit(rb.raw, as_json, render_markdown(rb))


@app.command("run")
def run(name: str = typer.Argument(..., help="Runbook name."),
        node: str = typer.Option(..., "--node", help="The node to run it on."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print each step and what it would do; change nothing."),
        label: list[str] = typer.Option([], "--label", help="KEY=VALUE an alert would carry (e.g. gpu=0); repeatable."),
        stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE, audit_db: Path = AUDIT_DB,
        runbooks: Path = RUNBOOKS, prometheus: str = PROMETHEUS, notify_file: Path = NOTIFY_FILE,
        inventory: Path = INVENTORY, as_json: bool = JSON_OPTION) -> None:
    """Run a runbook on a node by hand (audited; the same guards as an alert-triggered run)."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    audit_db = audit_db or lab_dir / "audit.db"
    engine = _engine(stack, lab_dir, state, audit_db, runbooks, prometheus, notify_file, inventory)
    if node not in engine.nodes:
        reason = f"{shown(node)} is not a node of stack {stack!r}; nodes: {', '.join(engine.nodes)}"
        engine.refusals.refuse(node, "cli", cli_identity(), reason)
        raise AidcError(reason)
    engine.catalog.get(name)  # an unknown runbook is bad input, said before any access check
    labels = {}
    for item in label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AidcError(f"--label expects KEY=VALUE, got {item!r}")
        labels[key] = value
    user = cli_identity()  # the effective uid's user, not $USER (which anyone can set)
    trigger = {"source": "cli", "user": user, "labels": labels}
    planning = dry_run or engine.policy.dry_run
    if not planning:  # a plan changes nothing; a run acts on the installation's nodes
        _trust_installation(engine, stack, lab_dir, user, f"run runbook {name} on {node}", node,
                            {"runbook": name, "trigger": trigger})
    authorize(engine.access_roles, [user], "viewer" if planning else "operator",
              f"{'plan' if planning else 'run'} runbook {name} on {node}", engine.audit, node,
              {"runbook": name, "trigger": trigger})
    if planning:
        plan = engine.plan(name, node, trigger)
        lines = [f"DRY RUN of {name} on {node}: nothing will be changed"]
        for p in plan:
            phase = " [on failure]" if p.phase == "on_failure" else ""
            gate = f"  ({p.gate})" if p.gate else ""
            if p.refused:
                lines.append(f"{p.idx + 1:2d}. {p.id} [{p.kind}]{phase}: WOULD BE REFUSED: {p.refused}"
                             f"  (it would {p.would})")
            else:
                lines.append(f"{p.idx + 1:2d}. {p.id} [{p.kind}]{phase}: would {p.would}{gate}")
        emit({"runbook": name, "node": node, "dry_run": True, "steps": [p.to_dict() for p in plan]},
             as_json, "\n".join(lines))
        return
    sub = engine.submit(name, node, trigger)
    if sub.outcome != "started":
        emit(sub.to_dict(), as_json, f"not started: {sub.outcome}: {sub.reason}")
        raise typer.Exit(1)
    result = engine.execute(sub.run_id)
    _emit_run(engine, result.id, as_json)
    if result.status == "failed":
        raise typer.Exit(1)


def _emit_run(engine, run_id: int, as_json: bool) -> None:
    run = engine.state.get_run(run_id)
    steps = engine.state.steps(run_id)
    lines = [f"run {run.id}: {run.runbook} on {run.node}: {run.status}" + (f" ({run.error})" if run.error else "")]
    for s in steps:
        res = s.result or {}
        note = res.get("error") or res.get("detail") or res.get("approved_by") or ""
        lines.append(f"  {s.idx + 1:2d}. {s.step_id:22s} {s.kind:10s} {s.status:8s} {note}")
    emit(finite({**run.to_dict(), "steps": [s.to_dict() for s in steps]}), as_json, "\n".join(lines))


@app.command("runs")
def runs(state: State = STATE, node: str = typer.Option(None, "--node", help="Only this node."),
         stack: str = vocabulary.stack_option("Read the runs where this stack's `state:` keeps them (postgres: "
                                              "the shared database; sqlite: --state's file)."),
         as_json: bool = JSON_OPTION) -> None:
    """List runs and their status from the durable state."""
    from aidc.spec import load_stack
    from aidc.state import open_run_state, resolve_dsn

    state_db = vocabulary.sqlite_path(state, RUN_STATE_DB)
    named = state.spec_state() if state is not None else load_stack(stack).state if stack is not None else None
    if named is not None and named.backend != "sqlite":
        st = open_run_state(named.backend, resolve_dsn(named))
    elif not state_db.exists():
        raise AidcError(f"no run state at {state_db}")
    else:
        st = open_run_state("sqlite", state_db)
    # finite(): a NaN stored by an older receiver is printed as "NaN", not a failed listing.
    data = finite([r.to_dict() for r in st.runs(node=node)])
    text = "\n".join(f"{r['id']:5d} {r['runbook']:28s} {r['node']:14s} {r['status']:18s} {r['error'] or ''}"
                     for r in data)
    emit(data, as_json, text or "(no runs)")


@app.command("approve")
def approve(run_id: int = typer.Argument(..., help="Run id (see `aidc runbook runs`)."),
            by: str = vocabulary.actor_option("A note on who approves (e.g. a full name), recorded beside the "
                                              "authenticated OS user, which is the approver."),
            resume: bool = typer.Option(True, "--resume/--no-resume",
                                        help="Continue the run here (else a running `serve` picks it up)."),
            stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE, audit_db: Path = AUDIT_DB,
            runbooks: Path = RUNBOOKS, prometheus: str = PROMETHEUS, notify_file: Path = NOTIFY_FILE,
            inventory: Path = INVENTORY, as_json: bool = JSON_OPTION) -> None:
    """Approve a run's waiting `approve` step."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    audit_db = audit_db or lab_dir / "audit.db"
    engine = _engine(stack, lab_dir, state, audit_db, runbooks, prometheus, notify_file, inventory)
    identity = cli_identity()
    _trust_installation(engine, stack, lab_dir, identity, f"approve run {run_id}", None,
                        {"run_id": run_id, **({"note": by} if by else {})})
    engine.approve(run_id, identity, by)
    if resume:
        engine.execute(run_id)
    _emit_run(engine, run_id, as_json)


@app.command("render")
def render(out: Path = typer.Option(None, "--out", help="Output directory (default: docs/runbooks/ of the project "
                                                         "you are in; needed anywhere else)."),
           runbooks: Path = RUNBOOKS, as_json: bool = JSON_OPTION) -> None:
    """Render every runbook to Markdown for humans (refreshes the checkout's docs/runbooks/)."""
    from aidc.runbook.render import render_all

    paths = render_all(_catalog(runbooks), out or _project_runbook_docs())
    emit([str(p) for p in paths], as_json, "\n".join(f"wrote {p}" for p in paths))


def _project_runbook_docs() -> Path:
    """docs/runbooks/ of the project the working directory is in (or $AIDC_ROOT's), where it
    exists already: never a new docs/ tree in whatever directory the command runs from."""
    from aidc.spec import project_root

    root = project_root().resolve()
    docs = root / "docs" / "runbooks"
    inside = bool(os.environ.get("AIDC_ROOT")) or Path.cwd().resolve().is_relative_to(root)
    if not (inside and docs.is_dir()):
        raise AidcError("no docs/runbooks/ in a project here (run it in the repository to refresh that one): "
                        "give --out DIR")
    return docs


@app.command("serve", context_settings=config.DAEMON_SETTINGS)
def serve(ctx: typer.Context,
          listen_address: str = vocabulary.listen_option("127.0.0.1:9097", "Where to listen for Alertmanager, "
                                                         "/metrics, /healthz and /readyz (port 0: any free port)."),
          token_file: Path = typer.Option(None, "--token-file",
                                          help="File holding the bearer token (else $AIDC_RUNBOOK_TOKEN); "
                                               "it authenticates as token:default."),
          token_map: Path = typer.Option(None, "--token-map",
                                         help="File of '<name> <sha256 hex of a token>' lines: each token "
                                              "authenticates as token:<name> (the tokens are stored nowhere)."),
          stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE, audit_db: Path = AUDIT_DB,
          runbooks: Path = RUNBOOKS, prometheus: str = PROMETHEUS, notify_file: Path = NOTIFY_FILE,
          inventory: Path = INVENTORY,
          tls_cert: Path = typer.Option(None, "--tls-cert", help="PEM server certificate: serve HTTPS."),
          tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
          client_ca: Path = typer.Option(None, "--client-ca",
                                         help="PEM CA whose client certificates are accepted: mutual TLS "
                                              "(then the token is optional)."),
          max_connections: int = typer.Option(512, "--max-connections", min=1,
                                              help="Open connections at once past the TLS handshake (as many "
                                                   "more may be in a handshake); more are answered 503 and logged."),
          max_per_source: int = typer.Option(64, "--max-per-source", min=1,
                                             help="Unauthenticated connections (TLS handshakes included) from one "
                                                  "address; more are answered 503. Raise it behind a proxy or NAT."),
          reserved_connections: int = typer.Option(None, "--reserved-connections", min=0,
                                                   help="With --client-ca: connections of --max-connections kept "
                                                        "for known identities (a client certificate with a role, "
                                                        "or any from the CA without roles). Default: a quarter."),
          handshake_timeout: float = typer.Option(3.0, "--handshake-timeout", min=0.01, max=3600,
                                                  help="Seconds from connect to a completed TLS handshake (a real "
                                                       "one takes milliseconds); then the connection is closed."),
          header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.01, max=3600,
                                               help="Seconds from connect to the end of the request headers "
                                                    "(TLS handshake included), however slowly they trickle; then 408."),
          body_timeout: float = typer.Option(10.0, "--body-timeout", min=0.01, max=3600,
                                             help="Seconds from the end of the headers to the end of the body; "
                                                  "then 408."),
          max_alerts: int = typer.Option(1000, "--max-alerts", min=1,
                                         help="Alerts in one notification; more is 413 (match Alertmanager's "
                                              "webhook max_alerts)."),
          request_workers: int = typer.Option(4, "--request-workers", min=1, max=256,
                                              help="Threads handling complete requests (slow clients use none)."),
          log_format: str = vocabulary.log_format_option("json"),
          config_file: Path = config.config_option(),
          print_config: bool = config.print_config_option(),
          stall_after: float = STALL_AFTER_OPTION) -> None:
    """Alertmanager webhook receiver. Resumes interrupted runs on start.

    Authentication: a bearer token (--token-file or $AIDC_RUNBOOK_TOKEN; sent as
    `Authorization: Bearer <token>`, the scheme in any case), mutual TLS (--tls-cert,
    --tls-key, --client-ca), or both, in which case both are required. One request per
    connection; bodies only as Content-Length (no chunked), at most 1 MiB; no NaN/Infinity.
    """
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    audit_db = audit_db or lab_dir / "audit.db"
    if print_config:
        config.print_config(ctx, False)
    from aidc.runbook import tls
    from aidc.runbook.receiver import Limits, Receiver

    host, port = vocabulary.parse_listen(listen_address, 9097)
    if reserved_connections is not None and reserved_connections >= max_connections:
        raise typer.BadParameter(f"{reserved_connections} must be less than --max-connections ({max_connections})",
                                 param_hint="--reserved-connections")

    if token_file:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise AidcError(f"cannot read token file {token_file}: {exc.strerror}") from None
    else:
        token = os.environ.get("AIDC_RUNBOOK_TOKEN", "").strip()
    tokens = load_token_map(token_map) if token_map else {}
    tls_config = tls.from_options(tls_cert, tls_key, client_ca)
    if not token and not tokens and not (tls_config and tls_config.mutual):
        raise AidcError("authentication is required: a bearer token (--token-file FILE or $AIDC_RUNBOOK_TOKEN, "
                        "or --token-map FILE), or mutual TLS (--tls-cert, --tls-key and --client-ca)")
    if token_file and not token:
        raise AidcError(f"token file {token_file} is empty")
    if tls_config:
        tls_config.server_context()  # bad certificate files fail here, before any state is opened
    limits = Limits(max_connections=max_connections, header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                    max_alerts=max_alerts, request_workers=request_workers, max_per_source=max_per_source,
                    reserved_connections=reserved_connections, handshake_timeout_s=handshake_timeout)
    _ensure_file_descriptors(max_connections)
    engine = _engine(stack, lab_dir, state, audit_db, runbooks, prometheus, notify_file, inventory)
    engine.recover_audit()  # records a crash of older code left out (runs finished without one)
    try:
        receiver = Receiver(engine, token or None, host, port, tls=tls_config, limits=limits, token_map=tokens,
                            log_format=log_format, stall_after_s=stall_after)
    except OSError as exc:
        raise AidcError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    signal.signal(signal.SIGTERM, lambda *_: receiver.engine.stop.set() or _shutdown_later(receiver))
    auth = " + ".join(name for name, on in (("bearer token", bool(token)), (f"{len(tokens)} mapped tokens", bool(tokens)),
                                            ("mutual TLS", bool(tls_config and tls_config.mutual))) if on)
    ready = f"ready on {receiver.scheme}://{host}:{receiver.port}/alerts ({auth}); metrics on /metrics, probes on /healthz and /readyz"
    if receiver.structured:
        receiver.log(ready, event="ready", port=receiver.port)
    else:
        typer.echo(f"aidc runbook serve: {ready}", err=True)
    receiver.serve_forever()


def _ensure_file_descriptors(max_connections: int) -> None:
    """Every connection is a file descriptor: raise the soft limit to fit, or say it cannot."""
    import resource

    # The shared pool, as many TLS handshakes, and 128 for the databases, the listener, runs' subprocesses.
    needed = 2 * max_connections + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise AidcError(f"--max-connections {max_connections} needs {needed} file descriptors; "
                            f"the hard limit (ulimit -Hn) is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _shutdown_later(receiver) -> None:
    # httpd.shutdown() blocks until serve_forever returns: call it off the signal handler's thread.
    import threading

    threading.Thread(target=receiver.httpd.shutdown, daemon=True).start()
