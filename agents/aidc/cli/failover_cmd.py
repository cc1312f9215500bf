"""`aidc failover`: the controller that turns fault events into guarded quarantines."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import typer

from aidc.audit import AuditLog
from aidc.cli import config
from aidc.cli import options as vocabulary
from aidc.cli.output import JSON_OPTION, STALL_AFTER_OPTION, emit
from aidc.errors import AidcError
from aidc.spec import load_stack
from aidc.store import Store

app = vocabulary.group(help="Fail over faulty nodes: quarantine within the blast radius, release by hand.")

STACK = vocabulary.stack_option("Stack file (scheduler, policy: max_unavailable, dry_run); `lab` only when the "
                                 "state directory is the lab's.")
LAB_DIR = vocabulary.state_dir_option(help="State directory: the event store and audit log (and the lab's nodes, "
                                           "scheduler 'lab'); /var/lib/aidc in production, .aidc/lab for the lab.")
STATE = vocabulary.state_option("The event store and audit log (sqlite: PATH is the event store file, default "
                                "STATE_DIR/state.db, the audit log stays STATE_DIR/audit.db).")
State = vocabulary.StateLocation


def _spec(stack: str, state: State | None = None):
    """The stack, its `state:` replaced by --state when one was given."""
    return vocabulary.with_state(load_stack(stack), state)


def _state_db(lab_dir: Path) -> Path:
    path = lab_dir / "state.db"
    if not path.exists():
        from aidc.lab.cluster import LabError

        raise LabError(f"no lab state in {lab_dir} (missing state.db): start one with `aidc lab run --keep`")
    return path


def _event_store(spec, lab_dir: Path, create: bool = False, state: State | None = None):
    """The event store the stack's `state:` names: LAB_DIR/state.db or --state's file (SQLite,
    which must exist unless `create`), or the shared PostgreSQL database."""
    from aidc.state import event_store_for

    if spec.state.backend == "sqlite":
        path = vocabulary.sqlite_path(state, lab_dir / "state.db")
        if not create and not path.exists():
            if state is not None:
                raise AidcError(f"no event store at {path} (--state)")
            _state_db(lab_dir)
        return Store(path)
    return event_store_for(spec.state, lab_dir / "state.db")


def _audit_log(spec, lab_dir: Path):
    """The audit log the stack's `state:` names: LAB_DIR/audit.db, or the shared PostgreSQL
    database (signed by the keyring LAB_DIR/audit.db.signing names, verified against LAB_DIR's
    installation record, as the SQLite log beside them is)."""
    from aidc.state import audit_log_for

    return audit_log_for(spec.state, lab_dir / "audit.db")


def _controller(stack: str, lab_dir: Path, dry_run: bool | None, create: bool = False, metrics=None,
                state: State | None = None):
    from aidc.audit.log import default_actor
    from aidc.failover.backends import check_backend, open_scheduler
    from aidc.failover.controller import FailoverController

    spec = _spec(stack, state)
    check_backend(spec)
    # The controller of a new lab may start before any agent has created the store.
    store = _event_store(spec, lab_dir, create, state)
    audit = _audit_log(spec, lab_dir)
    scheduler = open_scheduler(spec, lab_dir, audit=audit, actor=default_actor("failover"))
    return FailoverController(spec, store, audit, scheduler, dry_run=dry_run, metrics=metrics)


def _listen_options(listen: str | None, cert: Path | None, key: Path | None, client_ca: Path | None,
                    allow_client: list[str]):
    """(host, port, TLS config) for the agents' listener, or None; checked before anything starts."""
    from aidc.runbook.tls import from_options

    tls = from_options(cert, key, client_ca)
    if listen is None:
        if tls is not None or allow_client:
            raise AidcError("--tls-cert/--tls-key/--client-ca/--allow-client need --ingest-address HOST:PORT")
        return None
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AidcError(f"--ingest-address {listen}: expected HOST:PORT")
    if tls is None or not tls.mutual:
        raise AidcError("--ingest-address needs --tls-cert, --tls-key and --client-ca: agents are known by their "
                        "client certificates")
    tls.server_context()  # unreadable or mismatched files: an error now, not after the controller started
    return host.strip("[]"), int(port), tls


def _relays(stack: str, allow_client: list[str]) -> dict[str, list[str]]:
    """The nodes each --allow-client relay may report for: what the spec lists for it, never more."""
    if not allow_client:
        return {}
    listed = load_stack(stack).transport.relays
    for name in allow_client:
        if name not in listed:
            raise AidcError(f"--allow-client {name}: not a relay of stack {stack} (transport.relays lists the "
                            "nodes each relay may report for)")
    return {name: listed[name] for name in allow_client}


def _listener(ctl, options, relays: dict[str, list[str]], lab_dir: Path, api_token_map: Path | None = None):
    """The HTTPS listener for agents on other hosts (aidc.transport.ingest), which also serves
    the read-only health API (aidc.fleet.api) under the installation's roles."""
    from aidc.identity import load_token_map
    from aidc.installation import load
    from aidc.transport.ingest import IngestServer

    host, port, tls = options
    # The listener keeps connections of its own (its requests run on another thread): on
    # SQLite the controller's files, on PostgreSQL the same database, opened again. Its commits
    # queue on the controller's write lock.
    if ctl.spec.state.backend == "sqlite":
        store_at, audit_at = ctl.store.path, ctl.audit.path
    else:
        from aidc.state import event_store_for

        store_at = lambda: event_store_for(ctl.spec.state, lab_dir / "state.db")  # noqa: E731
        audit_at = lambda: _audit_log(ctl.spec, lab_dir)  # noqa: E731
    installed = load(lab_dir)
    roles = installed.roles if installed is not None else dict(ctl.spec.access.roles)
    tokens = load_token_map(api_token_map) if api_token_map is not None else None
    try:
        return IngestServer(store_at, audit_at, ctl.inventory, tls, host, port, relays=relays,
                            write_lock=ctl.write_lock, spec=ctl.spec, roles=roles, token_map=tokens)
    except OSError as exc:
        raise AidcError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@app.command("run", context_settings=config.DAEMON_SETTINGS)
def run(ctx: typer.Context, stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE,
        dry_run: bool = typer.Option(None, "--dry-run/--no-dry-run", help="Override the spec's policy.dry_run."),
        poll_interval: float = vocabulary.poll_interval_option(0.05, "Seconds between looks at the event store."),
        lease: str = typer.Option(None, "--lease",
                                  help="Controller lease backend; one controller acts at a time: directory "
                                       "(--lease-dir, on a filesystem every controller host shares), postgres "
                                       "(a row with a fencing token in the state database, no shared "
                                       "filesystem) or kubernetes (a coordination.k8s.io Lease, spec "
                                       "kubernetes.namespace/lease_name). Default: kubernetes with scheduler "
                                       "kubernetes, postgres with state.backend postgres, else directory."),
        lease_dir: Path = typer.Option(None, "--lease-dir",
                                       help="Lease directory for --lease directory (default: LAB_DIR/lease)."),
        lease_ttl: float = typer.Option(10.0, "--lease-ttl", min=0.5, max=600,
                                        help="Seconds without a heartbeat before another controller takes over."),
        ingest_address: str = typer.Option(None, "--ingest-address", metavar="HOST:PORT",
                                   help="Also receive fault events from agents on other hosts here "
                                        "(HTTPS, mutual TLS; POST /v1/events) and serve the read-only health "
                                        "API (GET /v1/fleet, /v1/nodes/...; role viewer; `aidc fleet nodes`)."),
        api_token_map: Path = typer.Option(None, "--api-token-map",
                                           help="Token map for the health API (lines '<name> <sha256 hex of the "
                                                "token>'): a bearer token adds token:<name> to the caller's "
                                                "certificate identity for access.roles."),
        tls_cert: Path = typer.Option(None, "--tls-cert", help="Server certificate (PEM) for --ingest-address."),
        tls_key: Path = typer.Option(None, "--tls-key", help="Its private key (PEM)."),
        client_ca: Path = typer.Option(None, "--client-ca", help="CA that signs the agents' client certificates; "
                                       "an agent may report only the node its certificate names (CN or DNS SAN)."),
        allow_client: list[str] = typer.Option([], "--allow-client",
                                               help="A certificate name that may report for other nodes (a relay): "
                                                    "for exactly those the spec's transport.relays lists for it."),
        listen_address: str = vocabulary.listen_option(
            None, "Serve the controller's metrics (aidc_failover_breaker_open, aidc_failover_escalations_total, "
                  "aidc_failover_lease_held, aidc_failover_oldest_undecided_event_age_seconds, and the "
                  "fleet-health figure aidc_fleet_healthy_gpu_ratio{pool}) on HOST:PORT/metrics, with /healthz "
                  "and /readyz: 127.0.0.1 on a laptop; 0.0.0.0 or the pod IP where Prometheus scrapes it (the "
                  "Deployment). Default: no metrics server."),
        stall_after: float = STALL_AFTER_OPTION,
        log_format: str = vocabulary.log_format_option("text"),
        config_file: Path = config.config_option(),
        print_config: bool = config.print_config_option(),
        ) -> None:
    """Run the controller until SIGTERM/SIGINT (acting only while it holds the lease).

    Every option can also come from AIDC_<OPTION> or a --config file (flag > env > file > the
    stack's spec > default)."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    if print_config:
        config.print_config(ctx, False, {"dry_run": load_stack(stack).policy.dry_run})
    from aidc.logs import DaemonLog

    daemon_log = DaemonLog("aidc.failover", log_format)
    daemon_log.capture("aidc")
    from aidc.failover.leases import open_lease

    options = _listen_options(ingest_address, tls_cert, tls_key, client_ca, allow_client)
    if api_token_map is not None and options is None:
        raise AidcError("--api-token-map needs --ingest-address HOST:PORT (the health API is served on that listener)")
    relays = _relays(stack, allow_client)
    metrics_listen = vocabulary.parse_listen(listen_address, None)
    elected = open_lease(lease, _spec(stack, state), lab_dir, lease_dir, lease_ttl)  # None: the Kubernetes Lease
    metrics = probe = None
    if metrics_listen is not None:
        listen_address, metrics_port = metrics_listen
        from aidc.failover.metrics import FailoverMetrics
        from aidc.probes import Probe

        metrics, probe = FailoverMetrics(), Probe("failover-controller", stall_after)
        try:
            # Before the store and audit open: a start stuck on them answers 503, not nothing.
            metrics.serve(metrics_port, addr=listen_address, probe=probe)
        except OSError as exc:
            raise AidcError(f"cannot serve metrics on {listen_address}:{metrics_port}: "
                            f"{exc.strerror or exc}") from None
    ctl = _controller(stack, lab_dir, dry_run, create=True, metrics=metrics, state=state)
    ctl.probe = probe
    if metrics is not None:
        metrics.add_fleet_health(ctl.spec, ctl.audit.path if ctl.spec.state.backend == "sqlite"
                                 else (lambda: _audit_log(ctl.spec, lab_dir)))
    _install_if_new(ctl.spec, stack, lab_dir)
    listener = _listener(ctl, options, relays, lab_dir, api_token_map) if options else None
    if listener is not None:
        listener.on_ingest = ctl.wake.set  # new events are decided at once, not at the next poll
    if getattr(ctl.scheduler, "on_quarantine", None) and (lab_dir / "lab.json").exists():
        # Tells the lab's rendezvous (lab, lab on Slurm). Warm: the notification needs
        # torch.distributed; import it now, not on the failover path. A state directory with no
        # lab in it (no lab.json) has no rendezvous to tell, and skips seconds of import.
        import torch.distributed  # noqa: F401

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serving = None
    if listener is not None:
        serving = threading.Thread(target=listener.serve_forever, name="event-listener", daemon=True)
        serving.start()
    daemon_log.event("controller started", event="ready", stack=stack, state_dir=str(lab_dir),
                     metrics=f"{listen_address}:{metrics_port}" if metrics_listen else None,
                     ingest=ingest_address)
    try:
        if ctl.scheduler.name == "kubernetes":
            from aidc.failover.k8s_controller import run_on_kubernetes

            run_on_kubernetes(ctl, stop, poll_interval)
        else:
            ctl.run(stop, poll_interval, lease=elected)
    finally:
        if listener is not None:
            listener.shutdown()
            serving.join(timeout=10)
        if metrics is not None:
            metrics.shutdown()


def _install_if_new(spec, stack: str, lab_dir: Path) -> None:
    """The controller's first start in a state directory is its installation: record the spec's
    roles and policy (and the audit log's signing key) unless an installer already did."""
    from aidc.identity import cli_identity
    from aidc.installation import record, record_path

    # Any record there, even one privileged commands distrust, is an installer's to replace.
    if not os.path.lexists(record_path(lab_dir)):
        pem, key_id = _audit_signing_key(lab_dir)
        record(lab_dir, spec, stack, public_key_pem=pem, key_id=key_id, recorded_by=cli_identity())


def _audit_signing_key(lab_dir: Path) -> tuple[str | None, str | None]:
    """The public key of the keyring that signs LAB_DIR's audit log (its sidecar), if any."""
    from aidc.audit.log import configured_signer

    signer = configured_signer(lab_dir / "audit.db")
    return (signer.public_key_pem(), signer.key_id) if signer is not None else (None, None)


@app.command("install")
def install(stack: str = STACK, lab_dir: Path = LAB_DIR,
            public_key: Path = typer.Option(None, "--public-key",
                                            help="The audit log's signing public key (PEM; default: the key of "
                                                 "the keyring LAB_DIR/audit.db.signing names, if any)."),
            as_json: bool = JSON_OPTION) -> None:
    """Record the stack's roles and policy (and the audit signing key) as this state directory's
    installation: privileged commands and audit verifiers trust this record, not a caller's --stack."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    from aidc.cli.audit_cmd import read_public_key
    from aidc.identity import cli_identity
    from aidc.installation import record

    spec = load_stack(stack)
    if not lab_dir.is_dir():
        raise AidcError(f"--lab-dir {lab_dir} is not a directory: install into an existing state directory")
    pem, key_id = (read_public_key(public_key), spec.kms.key_id) if public_key else _audit_signing_key(lab_dir)
    if pem is not None:
        from aidc.kms import verify_with_pem

        verify_with_pem(pem, b"", b"\0" * 64)  # not a public key: one clear error now, not at every verify
    identity = cli_identity()
    path = record(lab_dir, spec, stack, public_key_pem=pem, key_id=key_id, recorded_by=identity)
    with _audit_log(spec, lab_dir) as log:
        log.append("installation.recorded", f"{identity} recorded the installation from stack {stack}",
                   actor=identity, payload={"path": str(path), "stack": stack, "roles": dict(spec.access.roles),
                                            "signed": pem is not None})
    emit({"installation": str(path), "stack": stack, "roles": dict(spec.access.roles), "audit_signing_key": pem},
         as_json, f"recorded {path} from stack {stack}" + (" (with the audit signing key)" if pem else ""))


@app.command("release")
def release(node: str = typer.Argument(..., help="Node to return to service, or NODE/GPU for one GPU taken out "
                                                 "alone (e.g. n1/3)."),
            reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
            actor: str = typer.Option(None, "--actor",
                                      help="A note on who releases it (e.g. a full name), recorded beside the "
                                           "authenticated OS user, which is the actor."),
            stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE,
            dry_run: bool = typer.Option(None, "--dry-run/--no-dry-run",
                                         help="Override the spec's policy.dry_run (record, change nothing)."),
            as_json: bool = JSON_OPTION) -> None:
    """Return a quarantined node (or one GPU) to service (an approver's decision, audited as theirs).
    A repeat offender, or a node holding one, is refused: `aidc failover offender clear` first."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    from aidc.failover.offenders import OffenderError, parse_target
    from aidc.identity import authorize, cli_identity
    from aidc.installation import require

    try:
        name, gpu = parse_target(node)
    except OffenderError:  # not NODE/GPU: a name the controller refuses as no node (audited)
        name, gpu = node, None
    ctl = _controller(stack, lab_dir, dry_run, state=state)
    identity = cli_identity()
    about = {"reason": reason, **({"note": actor} if actor else {})}
    installed = require(lab_dir, ctl.spec, stack, identity, f"release {node}", ctl.audit, name, about)
    authorize(installed.roles, [identity], "approver", f"release {node}", ctl.audit, name, about)
    if gpu is not None:
        done = ctl.gpus.release(name, gpu, reason, identity, note=actor)
        return emit({"node": name, "gpu": gpu, "released": not ctl.dry_run, **done}, as_json,
                    f"{done['target']}: {'would be ' if ctl.dry_run else ''}released")
    decision = ctl.release(node, reason, identity, note=actor)
    # The controller settled dry-run (flag, else the spec's policy); report what it did.
    said = (decision or {}).get("decision")
    text = f"{node}: {'would be ' if ctl.dry_run else ''}released"
    if said == "not_drained":
        text = f"{node}: not drained, nothing to release"
    emit({"node": node, "released": not ctl.dry_run, **({"decision": said} if said else {})}, as_json, text)


@app.command("status")
def status(stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE, as_json: bool = JSON_OPTION) -> None:
    """Show node states and the fault events with their outcomes (on Slurm: what Slurm says)."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    from aidc.failover.backends import open_scheduler

    spec = _spec(stack, state)
    store = _event_store(spec, lab_dir, state=state)
    waiting = {i for i, _ in store.pending(limit=100000)}
    # A refused event keeps its verdict as outcome while it waits, pending, for capacity.
    events = [{"id": i, "node": e.node, "kind": e.kind.value, "xid": e.xid, "action": e.action.value, "outcome": o,
               "pending": i in waiting} for i, e, o in store.events()]
    states = {n: store.node_state(n) for n in {e["node"] for e in events} | set(store.nodes_in_state("quarantined", "quarantining"))}
    from aidc.failover.gpu_quarantine import gpus_out
    from aidc.failover.offenders import marks

    alone, offenders = gpus_out(store), marks(store)
    lines = [f"{n}: {s}" for n, s in sorted(states.items())]
    # GPUs taken out alone (their node in service) and repeat offenders, from this host's store.
    data: dict = {"nodes": states, "events": events, "gpus_out": alone, "repeat_offenders": sorted(offenders)}
    scheduler = open_scheduler(spec, lab_dir, tell_rendezvous=False)
    wide = getattr(scheduler, "out_of_service", None)
    if wide is not None:
        # The scheduler's truth (what the blast radius counts), next to this host's records.
        out = {name: st.to_dict() for name, st in sorted(wide().items())}
        data["scheduler_out_of_service"] = out
        lines = [f"{n}: {st['why_out']} ({st['state']}: {st['reason'] or 'no reason'})" for n, st in out.items()] \
            or [f"{scheduler.name}: no node out of service"]
    lines += [f"{name}: {entry['state']} alone ({entry['reason']})" for name, entry in sorted(alone.items())]
    lines += [f"{name}: repeat offender (`aidc failover offender list`)" for name in sorted(offenders)]
    text = "\n".join(lines + [event_line(e) for e in events])
    emit(data, as_json, text or "no events")


def event_line(event: dict) -> str:
    """One fault event for `failover status`: its XID only where it has one (a straggler or a
    link fault has none)."""
    xid = f" xid={event['xid']}" if event["xid"] is not None else ""
    return f"event {event['id']}: {event['node']} {event['kind']}{xid} -> {event['action']} [{_outcome_text(event)}]"


def _outcome_text(event: dict) -> str:
    if event["pending"]:
        return f"pending: {event['outcome']}" if event["outcome"] else "pending"
    return event["outcome"]


breaker_app = typer.Typer(help="The circuit breaker: failover stops acting after too many quarantines in a "
                               "window (policy.breaker) until a person resets it.", no_args_is_help=True)
app.add_typer(breaker_app, name="breaker")


def _gate(stack: str, lab_dir: Path, state: State | None = None):
    from aidc.failover.remediation import RemediationGate

    spec = _spec(stack, state)
    return RemediationGate(spec, _event_store(spec, lab_dir, state=state), _audit_log(spec, lab_dir))


def _breaker_view(gate) -> dict:
    """What `breaker status` reports (also as JSON)."""
    recent = gate.recent_quarantines()
    return {"breaker": gate.breaker(), "quarantines_in_window": len(recent), "limit": gate.breaker_limit(),
            "window_min": gate.breaker_policy.window_min, "recent_quarantines": recent,
            "deferred_events": [{"id": i, "node": e.node, "verdict": gate.store.outcome(i)}
                                for i, e in gate.store.pending(limit=100000) if gate.store.outcome(i)]}


@breaker_app.command("status")
def breaker_status(stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE,
                   as_json: bool = JSON_OPTION) -> None:
    """Is the breaker open, why, and how many quarantines the window holds against its limit."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    from aidc.failover.remediation import utc_text

    view = _breaker_view(_gate(stack, lab_dir, state))
    state = view["breaker"]
    if state.get("open"):
        text = f"breaker OPEN since {utc_text(state['opened_at'])}: {state['reason']}"
    else:
        text = "breaker closed" + (f" (reset by {state['closed_by']}: {state['close_reason']})"
                                   if state.get("closed_by") else "")
    text += (f"\n{view['quarantines_in_window']} of {view['limit']} quarantine(s) in the last "
             f"{view['window_min']:g} min; {len(view['deferred_events'])} event(s) waiting for capacity")
    emit(view, as_json, text)


@breaker_app.command("reset")
def breaker_reset(reason: str = typer.Option(..., "--reason", help="Why it is safe to act again (audited)."),
                  actor: str = typer.Option(None, "--actor", help="A note on who resets it (e.g. a full name), "
                                            "recorded beside the authenticated OS user, which is the actor."),
                  stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE,
                  as_json: bool = JSON_OPTION) -> None:
    """Close the breaker (a person's decision, needs the approver role; audited as theirs).
    Events it held back are decided again by the running controller."""
    stack, lab_dir = vocabulary.resolve_stack_and_state_dir(stack, lab_dir)
    from aidc.identity import authorize, cli_identity
    from aidc.installation import require

    if not reason.strip():
        raise AidcError("--reason must say why it is safe for failover to act again")
    gate = _gate(stack, lab_dir, state)
    identity = cli_identity()
    about = {"reason": reason, **({"note": actor} if actor else {})}
    action = "reset the failover circuit breaker"
    installed = require(lab_dir, gate.spec, stack, identity, action, gate.audit, None, about)
    authorize(installed.roles, [identity], "approver", action, gate.audit, None, about)
    was = gate.reset(identity, reason, note=actor)
    emit({"reset": True, "was_open": bool(was.get("open")), "by": identity, "was": was}, as_json,
         "breaker reset" + ("" if was.get("open") else " (it was not open)"))


offender_app = typer.Typer(help="Repeat offenders (policy.offenders): nodes and GPUs marked for repair/RMA, which "
                                "recertification does not return to service until an approver clears them.",
                           no_args_is_help=True)
app.add_typer(offender_app, name="offender")


def _offenders(stack: str, lab_dir: Path, state: State | None = None):
    from aidc.failover.offenders import Offenders
    from aidc.health.catalog import load_catalog

    spec = _spec(stack, state)
    return Offenders(spec, _event_store(spec, lab_dir, state=state), AuditLog(lab_dir / "audit.db"), load_catalog())


@offender_app.command("list")
def offender_list(stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE,
                  as_json: bool = JSON_OPTION) -> None:
    """The nodes and GPUs marked repeat offenders, why, and the faults that counted."""
    from aidc.failover.offenders import marks
    from aidc.failover.remediation import utc_text

    offenders = _offenders(stack, lab_dir, state)
    current = marks(offenders.store)
    lines = [f"{name}: marked {utc_text(m['marked_at'])}, {m['reason']}" for name, m in sorted(current.items())]
    emit({"offenders": current, "max_faults": offenders.policy.max_faults,
          "window_days": offenders.policy.window_days}, as_json, "\n".join(lines) or "no repeat offenders")


@offender_app.command("clear")
def offender_clear(target: str = typer.Argument(..., help="NODE or NODE/GPU (e.g. n1 or n1/3)."),
                   reason: str = typer.Option(..., "--reason", help="Why it may return (repaired, replaced; audited)."),
                   actor: str = typer.Option(None, "--actor", help="A note on who clears it (e.g. a full name), "
                                             "recorded beside the authenticated OS user, which is the actor."),
                   stack: str = STACK, lab_dir: Path = LAB_DIR, state: State = STATE,
                   as_json: bool = JSON_OPTION) -> None:
    """Clear a repeat offender (needs the approver role; audited as theirs). It stays out of
    service: `aidc failover release` returns it once it is repaired and recertified."""
    from aidc.failover.offenders import parse_target
    from aidc.identity import authorize, cli_identity
    from aidc.installation import require

    if not reason.strip():
        raise AidcError("--reason must say why the node or GPU may return to service")
    node, _ = parse_target(target)
    offenders = _offenders(stack, lab_dir, state)
    identity = cli_identity()
    about = {"reason": reason, "target": target, **({"note": actor} if actor else {})}
    action = f"clear repeat offender {target}"
    installed = require(lab_dir, load_stack(stack), stack, identity, action, offenders.audit, node, about)
    authorize(installed.roles, [identity], "approver", action, offenders.audit, node, about)
    was = offenders.clear(target, identity, reason, note=actor)
    emit({"cleared": was["target"], "by": identity, "was": was}, as_json,
         f"{was['target']}: repeat offender cleared (was: {was['reason']})")
