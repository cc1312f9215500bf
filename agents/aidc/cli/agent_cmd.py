"""`aidc agent`: the node agent (watch loop) as a long-running process."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import typer

from aidc.cli import config, options
from aidc.cli.output import JSON_OPTION, STALL_AFTER_OPTION, emit
from aidc.errors import AidcError, DeviceError
from aidc.health.stragglers import STEP_TIMES_FILE
from aidc.spec import StragglerPolicy
from aidc.spec import AGENT_METRICS_PORT

app = options.group(help="The node agent: watch GPUs and the kernel log, emit fault events, export metrics.")


@app.command("run", context_settings=config.DAEMON_SETTINGS)
def run(ctx: typer.Context,
        node: str = typer.Option(..., help="This node's name (as in the cluster spec)."),
        backend: str = options.choice_option("nvml", "--backend", options.DEVICE_BACKENDS,
                                             "Device backend: nvml (real driver) or sim (lab)."),
        node_dir: Path = typer.Option(None, help="Simulated node directory (sim backend)."),
        kernel_log: Path = typer.Option(None, help="Kernel log to follow: a file or /dev/kmsg "
                                                   "(default: <node-dir>/kern.log for sim, /dev/kmsg for nvml)."),
        state_dir: Path = options.state_dir_option(help="Directory of this node's state: the event store "
                                                        "(state.db) and audit log (audit.db); /var/lib/aidc."),
        store: Path = typer.Option(None, help="Durable event store (SQLite) that failover reads "
                                              "(default: STATE_DIR/state.db)."),
        audit_db: Path = options.audit_db_option(None, "Audit log database (SQLite; default: STATE_DIR/audit.db)."),
        dcgm_exporter: str = options.choice_option("absent", "--dcgm-exporter", options.DCGM_EXPORTER,
                                                   "present: dcgm-exporter runs on this node too, so the DCGM_FI_* "
                                                   "series it exports by default are left to it; absent: export all."),
        checkpoint_path: list[str] = typer.Option([], "--checkpoint-path",
                                                  help="Checkpoint volume to report the fill level of "
                                                       "(aidc_checkpoint_volume_used_ratio); repeatable."),
        sysfs_root: Path = typer.Option(None, "--sysfs-root",
                                        help="Where sysfs is mounted, for InfiniBand ports (nvml backend; "
                                             "default /sys). The sim backend keeps its own under --node-dir."),
        listen_address: str = options.listen_option(
            f"127.0.0.1:{AGENT_METRICS_PORT}",
            "Where the metrics server (/metrics, /healthz, /readyz) listens: 127.0.0.1 on a laptop; 0.0.0.0 or the "
            "pod IP where Prometheus scrapes it (the DaemonSet); port 0: no server. dcgm-exporter has 9400."),
        poll_interval: float = options.poll_interval_option(1.0, "Seconds between polls (device and kernel log)."),
        device_timeout: float = typer.Option(2.0, min=0.01, help="Seconds before a device call counts as hung."),
        controller_url: str = typer.Option(None, "--controller-url",
                                           help="https://HOST:PORT of a failover controller on another host: "
                                                "forward this node's fault events there (the store is the outbox)."),
        tls_cert: Path = typer.Option(None, "--tls-cert", help="This node's client certificate (PEM); its CN or "
                                                             "a DNS subjectAltName must be the node's name."),
        tls_key: Path = typer.Option(None, "--tls-key", help="Its private key (PEM)."),
        ca: Path = typer.Option(None, "--ca", help="CA certificate (PEM) that signed the controller's certificate."),
        metrics_tls_cert: Path = typer.Option(None, "--metrics-tls-cert",
                                              help="Serve /metrics over HTTPS with this server certificate (PEM)."),
        metrics_tls_key: Path = typer.Option(None, "--metrics-tls-key", help="Its private key (PEM)."),
        metrics_client_ca: Path = typer.Option(None, "--metrics-client-ca",
                                               help="Only scrapers with a client certificate from this CA (PEM)."),
        kubernetes: bool = typer.Option(False, "--kubernetes",
                                        help="Report this node's faults through the Kubernetes API (the "
                                             "AidcGpuHealthy node condition and an Event each), with the pod's "
                                             "service account, for the failover controller to watch."),
        step_times: Path = typer.Option(None, "--step-times",
                                        help="The training job's step-time report for this node (JSON lines: "
                                             "every rank's compute and communication time per step) to judge "
                                             "stragglers from; sim backend: <node-dir>/steptimes.jsonl."),
        straggler_window: int = typer.Option(StragglerPolicy().window_steps, "--straggler-window", min=5,
                                             max=10000, help="Steps in the straggler window "
                                                             "(spec: policy.stragglers.window_steps)."),
        straggler_tolerance: float = typer.Option(StragglerPolicy().tolerance, "--straggler-tolerance",
                                                  min=0.001, max=0.999,
                                                  help="Compute this fraction above the fleet median counts as "
                                                       "slow (spec: policy.stragglers.tolerance)."),
        stall_after: float = STALL_AFTER_OPTION,
        log_format: str = options.log_format_option("text"),
        config_file: Path = config.config_option(),
        print_config: bool = config.print_config_option(),
        as_json: bool = JSON_OPTION) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly and print what was emitted.

    Every option can also come from AIDC_<OPTION> or a --config file (flag > env > file > default).
    """
    if print_config:
        config.print_config(ctx, as_json)
    from aidc.logs import DaemonLog

    daemon_log = DaemonLog("aidc.agent", log_format)
    daemon_log.capture("aidc")
    from aidc.device import open_backend
    from aidc.health.agent import run_agent
    from aidc.transport.forwarder import Forwarder, client_tls

    store, audit_db = _state_files(state_dir, store, audit_db)
    transport = client_tls(controller_url, tls_cert, tls_key, ca)
    if kubernetes and transport:
        raise typer.BadParameter("report through --kubernetes or to --controller-url, not both",
                                 param_hint="--kubernetes")
    forwarder = Forwarder(store, node, controller_url, transport) if transport else None
    if kubernetes:
        from aidc.failover.kubernetes import api_client_from
        from aidc.health.k8s_publisher import KubernetesForwarder, NodeFaultPublisher
        from aidc.spec import Kubernetes

        forwarder = KubernetesForwarder(store, node, NodeFaultPublisher(api_client_from(Kubernetes()), node))

    listen_address, port = options.parse_listen(listen_address, AGENT_METRICS_PORT)
    metrics_tls = _metrics_tls(metrics_tls_cert, metrics_tls_key, metrics_client_ca)

    if backend == "sim":
        if node_dir is None:
            raise DeviceError("--backend sim needs --node-dir (the lab node's directory)")
        dev = open_backend("sim", node_dir=node_dir)
        kernel_log = kernel_log or node_dir / "kern.log"
        step_times = step_times or node_dir / STEP_TIMES_FILE
    else:
        dev = open_backend(backend, **({"sysfs_root": str(sysfs_root)} if sysfs_root and backend == "nvml" else {}))
        kernel_log = kernel_log or Path("/dev/kmsg")
    stop = threading.Event()
    ready = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def announce():
        ready.wait()
        if not stop.is_set():
            scheme = "https" if metrics_tls else "http"
            where = f"{scheme}://{listen_address}:{port}/metrics" if port else "no metrics server"
            daemon_log.say(f"watching {node} ({backend}), kernel log {kernel_log}, {where}", event="ready",
                           node=node, backend=backend, port=port or None)

    threading.Thread(target=announce, daemon=True).start()
    forwarding = None
    if forwarder is not None:
        # Stopped after the agent: what the agent wrote while stopping still gets a chance to go.
        forwarder_stop = threading.Event()
        forwarding = threading.Thread(target=forwarder.run, args=(forwarder_stop,), name="forwarder", daemon=True)
        forwarding.start()
    try:
        agent = run_agent(node, dev, kernel_log, store, audit_db, port, poll_interval, stop,
                          device_timeout_s=device_timeout, ready=ready, listen_address=listen_address,
                          metrics_tls=metrics_tls, checkpoint_paths=tuple(checkpoint_path),
                          dcgm_exporter_present=dcgm_exporter == "present", step_times=step_times,
                          straggler_policy=StragglerPolicy(window_steps=straggler_window,
                                                           tolerance=straggler_tolerance),
                          stall_after_s=stall_after)
    finally:
        if forwarding is not None:
            forwarder_stop.set()
            forwarding.join(timeout=forwarder.timeout_s + 1)
    summary = {"node": node, "backend": backend, "events_emitted": agent.emitted,
               "hung_device_calls": agent.dev.hung_calls, "active_conditions": sorted(agent.conditions.active)}
    if forwarder is not None:
        summary["events_forwarded"] = forwarder.forwarded
    emit(summary, as_json, f"aidc agent: {node} stopped; {agent.emitted} fault event(s) emitted")
    if agent.dev.hung_calls:
        # A hung driver call's thread cannot be joined or killed; the interpreter would wait
        # for it at exit. Everything is written and closed, so leave without waiting.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _state_files(state_dir: Path | None, store: Path | None, audit_db: Path | None) -> tuple[Path, Path]:
    """The event store and audit log: named one by one, or found in the state directory."""
    if state_dir is None and (store is None or audit_db is None):
        raise AidcError("aidc agent run needs --state-dir (or AIDC_STATE_DIR; /var/lib/aidc in production), "
                        "or both --store and --audit-db")
    return store or state_dir / "state.db", audit_db or state_dir / "audit.db"


def _metrics_tls(cert: Path | None, key: Path | None, client_ca: Path | None):
    """The metrics server's TLS config, checked now (bad files: one error line before anything starts)."""
    if cert is None and key is None and client_ca is None:
        return None
    from aidc.runbook.tls import TLSConfig  # only here: it brings the runbook engine (jsonschema) along
    if cert is None or key is None:
        raise AidcError("--metrics-tls-cert and --metrics-tls-key go together (and --metrics-client-ca needs both)")
    config = TLSConfig(cert, key, client_ca)
    try:
        config.server_context()
    except AidcError as exc:
        raise AidcError(f"metrics TLS: {exc}".replace("--tls-", "--metrics-tls-")
                        .replace("--client-ca", "--metrics-client-ca")) from None
    return config

