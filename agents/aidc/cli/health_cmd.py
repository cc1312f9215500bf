"""`aidc health`: read GPU faults out of a kernel log and classify them with the XID catalog."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

from aidc.cli.options import DEVICE_BACKENDS, VocabularyGroup, choice_option

from aidc.cli.output import JSON_OPTION, emit, emit_lines, timestamp
from aidc.errors import AidcError, DeviceError

app = typer.Typer(cls=VocabularyGroup, help="GPU fault detection: kernel-log parsing and XID classification.", no_args_is_help=True)


class LogFileError(AidcError):
    """The log file named on the command line cannot be read."""


@app.command("parse-log")
def parse_log(file: Path = typer.Argument(..., help="Kernel log: dmesg, dmesg -T/-r/-x, journald/syslog text or "
                                                    "JSON, or /dev/kmsg records; - reads standard input "
                                                    "(dmesg | aidc health parse-log -)."),
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
    from_stdin = str(file) == "-"
    if from_stdin:
        file = Path("<stdin>")  # named so in warnings and messages
    elif not file.exists():
        raise LogFileError(f"{file}: no such file")
    elif file.is_dir():
        raise LogFileError(f"{file}: is a directory, expected a kernel log file")
    number = 0
    skipped: list[tuple[int, str]] = []
    parser = KernelLogParser(on_unparsed=lambda _line, why: skipped.append((number, why)))
    rows: list[dict] = []
    try:
        with (contextlib.nullcontext(sys.stdin.buffer) if from_stdin else open(file, "rb")) as fh:
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
    lines = [f"{r['id']:>5}  {timestamp(r.get('observed_at'))}  {r['node']:<12} {r['kind']:<18} {'' if r['xid'] is None else r['xid']:>4}  "
             f"{r['action']:<16} {r['outcome'] or 'pending':<14} {r['message']}" for r in rows]
    emit(rows, as_json, "\n".join(lines) or "no fault events")


@app.command("check", context_settings={"help_option_names": ["--help", "-h"]})
def check(node: str = typer.Option(..., "--node", help="This node's name (as in the cluster spec)."),
          stack: str = typer.Option(None, "--stack", "-s", envvar="AIDC_STACK", help="Cluster spec (name or file, e.g. /etc/aidc/stack.yaml): "
                                    "the node's GPU count, policy.out_of_service_actions, the device backend "
                                    "and the window (2 x slurm.health_check_interval_s)."),
          backend: str = choice_option(None, "--backend", DEVICE_BACKENDS,
                                       "Device backend: nvml or sim (default: the spec's, else nvml)."),
          node_dir: Path = typer.Option(None, help="Simulated node directory (sim backend)."),
          kernel_log: Path = typer.Option(None, help="Kernel log to look at: a file or /dev/kmsg (default: "
                                                     "<node-dir>/kern.log for sim, the spec's agent.kernel_log "
                                                     "or /dev/kmsg for nvml)."),
          no_kernel_log: bool = typer.Option(False, "--no-kernel-log", help="Check the device layer only."),
          since_s: float = typer.Option(None, "--since-s", min=0.001, help="Only kernel-log faults this recent count "
                                        "(default: twice the spec's health-check interval, else 600)."),
          gpus: int = typer.Option(None, "--gpus", min=0, help="GPUs this node must show (default: the spec's)."),
          device_timeout: float = typer.Option(1.0, "--device-timeout", min=0.01,
                                               help="Seconds before a device call counts as hung (unhealthy)."),
          as_json: bool = JSON_OPTION) -> None:
    """One-shot node health check for Slurm's HealthCheckProgram: exit 0 healthy, 1 unhealthy
    (with one reason line), 2 bad usage.

    Looks at the device layer (GPU count, lost GPUs, pending row remaps, ECC, links, a hang
    under --device-timeout) and the recent kernel log (XIDs and other GPU faults within
    --since-s), and calls the node unhealthy when a finding's catalog action is one of the
    spec's policy.out_of_service_actions. Read-only: it never drains the node. The failover
    controller does that (audited, within the blast radius) from the agent's events; Slurm
    may also act on the exit code if its HealthCheckProgram wrapper is told to.
    """
    import os
    import sys

    from aidc.device import open_backend
    from aidc.health.catalog import load_catalog
    from aidc.health.check import check_node

    out_of_service = {"reset_gpu", "reboot_node", "contact_support"}  # Policy()'s default, without pydantic
    if stack is not None:
        from aidc.spec import load_stack

        spec = load_stack(stack)
        match = [n for n in spec.nodes() if n.name == node]
        if not match:
            raise typer.BadParameter(f"{node!r} is not a node of cluster {spec.name}", param_hint="--node")
        gpus = match[0].gpus if gpus is None else gpus
        backend = backend or spec.device_backend
        out_of_service = set(spec.policy.out_of_service_actions)
        since_s = since_s or 2 * max(spec.slurm.health_check_interval_s, 30)
        if kernel_log is None and backend == "nvml":
            kernel_log = Path(spec.agent.kernel_log)
    backend = backend or "nvml"
    since_s = since_s or 600.0
    if backend not in ("sim", "nvml"):
        raise typer.BadParameter(f"{backend!r}; valid: nvml, sim", param_hint="--backend")
    if backend == "sim" and node_dir is None:
        raise typer.BadParameter("is required with --backend sim (the lab's nodes/<name>)", param_hint="--node-dir")
    if not no_kernel_log:
        kernel_log = kernel_log or (node_dir / "kern.log" if backend == "sim" else Path("/dev/kmsg"))
        if not kernel_log.exists() or not os.access(kernel_log, os.R_OK):
            raise LogFileError(f"kernel log {kernel_log}: "
                               f"{'not readable by this user' if kernel_log.exists() else 'no such file'}")
    else:
        kernel_log = None
    try:
        dev = open_backend(backend, **({"node_dir": node_dir} if backend == "sim" else {}))
    except DeviceError as exc:
        # A GPU node whose driver does not answer cannot run GPU work: unhealthy, not a usage error.
        emit({"node": node, "healthy": False, "reason": f"device layer unavailable: {exc}"}, as_json,
             f"{node}: unhealthy: device layer unavailable: {exc}")
        raise typer.Exit(1) from None
    boot_time = None
    if backend == "sim":
        from aidc.device import sim

        boot_time = sim.boot_time(node_dir)
    result = check_node(node, dev, catalog=load_catalog(), out_of_service=out_of_service, kernel_log=kernel_log,
                        since_s=since_s, boot_time=boot_time, expected_gpus=gpus, device_timeout_s=device_timeout)
    emit(result.to_dict(), as_json, f"{node}: {'healthy' if result.healthy else 'unhealthy: ' + result.reason}")
    if result.device_hung:
        # The hung call still runs on a daemon thread; leave without waiting for the driver.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    raise typer.Exit(0 if result.healthy else 1)
