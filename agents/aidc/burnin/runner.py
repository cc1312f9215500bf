"""Run a lab burn-in: one process per node on this machine, gloo on 127.0.0.1.

The runner holds the rendezvous store itself (a TCPStore bound to a free loopback
port chosen by the kernel, so no port race), starts the node processes (forked by
`aidc.burnin.zygote`, in a session of their own), follows their progress on one pipe,
and on any failure or timeout kills the whole session (no orphans). Then it judges
the fleet and appends one certificate per node to the audit log.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from aidc.audit.log import AuditLog, default_actor
from aidc.burnin.collectives import sweep_sizes
from aidc.burnin.judge import judge
from aidc.burnin.report import BurninReport, NodeResult
from aidc.burnin.storage import STORAGE_METRICS
from aidc.burnin.worker import PREFIX
from aidc.errors import BurninError
from aidc.spec import ClusterSpec

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding `aidc/`


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # One compute thread per node process: the lab shares a few cores among all nodes.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    return env


class _Fleet:
    """The node processes: one zygote that forks a worker per node, in its own session.

    Stopping the session's process group stops the zygote and every worker at once.
    """

    def __init__(self, tmpdir: Path):
        self.tmpdir = tmpdir
        self.proc: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()
        self.node_of: dict[str, str] = {}

    def start(self) -> None:
        """Start the zygote now: it imports torch while the runner prepares the work."""
        with open(self.tmpdir / "zygote.log", "wb") as log:
            # The run directory on the command line names the run in `ps` (and for tests).
            self.proc = subprocess.Popen([sys.executable, "-m", "aidc.burnin.zygote", str(self.tmpdir)],
                                         stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=_worker_env(),
                                         start_new_session=True)
        threading.Thread(target=self._follow, args=(self.proc,), daemon=True).start()

    def release(self, configs: dict[str, Path]) -> None:
        """Hand the zygote one worker config per node; it forks them once its imports are done."""
        self.node_of = {str(path): node for node, path in configs.items()}
        try:
            self.proc.stdin.write("".join(f"{path}\n" for path in configs.values()).encode())
            self.proc.stdin.close()
        except BrokenPipeError:  # it died while importing: the follow loop reports its exit code
            pass

    def _follow(self, proc: subprocess.Popen) -> None:
        with proc.stdout:
            self._read(proc.stdout)

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if not line.startswith(PREFIX):
                continue
            try:
                event = json.loads(line[len(PREFIX):])
            except json.JSONDecodeError:
                continue
            if event["event"] == "exit":
                event["node"] = self.node_of.get(event["config"], event["config"])
            self.events.put(event)

    def log_tail(self, node: str | None, chars: int = 1500) -> str:
        path = self.tmpdir / (f"{node}.log" if node else "zygote.log")
        try:
            return path.read_text(errors="replace")[-chars:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def stop_all(self) -> None:
        if self.proc is None:
            return
        try:  # the zygote leads its own session; its forked workers share its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # The pipe is closed by its reader at end of file (closing it here could block
        # behind that reader while any writer lives).


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("burn-in"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    bar.start()
    bar.add_task("starting nodes", total=total)
    return bar


def _describe(event: dict) -> str:
    kind = event["event"]
    if kind == "sampled":
        return f"GEMM + memcpy on {event['node']} (round {event['round'] + 1})"
    if kind == "allreduce":
        return f"all_reduce {event['nbytes']} B"
    if kind == "train":
        return f"DDP step {event['step']} loss {event['loss']:.4f}"
    return f"{event['node']} {kind}"


def lab_node_dirs(spec, lab_dir: Path) -> dict[str, Path]:
    """The lab's simulated node directories `<lab_dir>/nodes/<node>`, created healthy where missing."""
    from aidc.device.sim import STATE_FILE, create_node

    dirs = {}
    for index, node in enumerate(spec.nodes()):
        d = lab_dir / "nodes" / node.name
        if not (d / STATE_FILE).exists():
            create_node(d, node.name, node.gpus, index)
        dirs[node.name] = d
    return dirs


def run_burnin(spec: ClusterSpec, node_dirs: dict[str, Path] | None, audit: AuditLog | None = None,
               progress: bool = False, *, timeout_s: float = 300.0, corrupt_nodes: frozenset[str] = frozenset(),
               target_sample_s: float = 0.02) -> BurninReport:
    """Burn in every node of the spec (spares included) on this machine; judge; certify.

    `node_dirs` maps node name -> simulated node directory (sim backend). `corrupt_nodes`
    is lab fault injection: those nodes flip one parameter bit after training, which the
    silent-data-corruption check must catch. Raises BurninError when the run cannot
    complete (recorded in the audit log as `burnin.aborted`); failed nodes are verdicts.
    """
    nodes = spec.nodes()
    if not timeout_s > 0:
        raise BurninError(f"the burn-in timeout must be positive, got {timeout_s:g} s")
    if spec.device_backend != "sim":
        raise BurninError("run_burnin runs a fleet of simulated nodes on one machine; the stack uses the"
                          f" {spec.device_backend!r} backend (use bench/gpu_check.sh on a GPU machine)")
    missing = [n.name for n in nodes if not node_dirs or n.name not in node_dirs]
    if missing:
        raise BurninError(f"no node directory for {', '.join(missing)} (create them with aidc.device.sim.create_node)")
    started = time.monotonic()
    policy = spec.policy.burnin
    sizes = sweep_sizes(policy.allreduce_min_bytes, policy.allreduce_max_bytes)
    bar = _progress_bar(progress, len(nodes) * (1 + policy.repeats) + len(sizes) + policy.train_steps)
    with tempfile.TemporaryDirectory(prefix="aidc-burnin-") as tmp:
        tmpdir = Path(tmp)
        fleet = _Fleet(tmpdir)
        try:
            fleet.start()  # the zygote imports torch while this process does the same for the store
            import torch.distributed as dist  # only for the rendezvous store: the parent computes nothing

            store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=timeout_s))
            configs = {}
            for rank, node in enumerate(nodes):
                cfg = {
                    "rank": rank, "world": len(nodes), "node": node.name, "store_port": store.port,
                    "backend": "sim", "backend_kwargs": {"node_dir": str(node_dirs[node.name])},
                    "device_timeout_s": spec.agent.device_timeout_s, "pg_timeout_s": timeout_s,
                    "gemm_size": policy.gemm_size, "repeats": policy.repeats, "memcpy_bytes": policy.memcpy_bytes,
                    "target_sample_s": target_sample_s, "sizes": sizes, "train_steps": policy.train_steps,
                    "corrupt_parameters": node.name in corrupt_nodes,
                    # The lab node's own directory stands in for its mount of the spec's checkpoint path.
                    "storage_path": str(node_dirs[node.name] / "checkpoints"),
                    "storage_bytes": policy.storage_bytes, "storage_files": policy.storage_files,
                    "result_path": str(tmpdir / f"{node.name}.result.json"),
                }
                configs[node.name] = tmpdir / f"{node.name}.json"
                configs[node.name].write_text(json.dumps(cfg))
            fleet.release(configs)
            _follow_until_done(fleet, bar, started + timeout_s, timeout_s)
            raw = {}
            for node in nodes:
                path = tmpdir / f"{node.name}.result.json"
                if not path.exists():
                    raise BurninError(f"node {node.name} exited without a result: {fleet.log_tail(node.name)}")
                raw[node.name] = json.loads(path.read_text())
        except BurninError as exc:
            if audit is not None:  # an aborted burn-in is a result too: no node was certified
                audit.append("burnin.aborted", str(exc)[:2000], actor=default_actor("burnin"),
                             payload={"nodes": [n.name for n in nodes], "timeout_s": timeout_s})
            raise
        finally:
            fleet.stop_all()
            if bar:
                bar.stop()
    report = _judged_report(spec, nodes, raw, time.monotonic() - started)
    if audit is not None:
        _certify(audit, report)
    return report


def _judged_report(spec: ClusterSpec, nodes: list, raw: dict[str, dict], duration_s: float) -> BurninReport:
    policy = spec.policy.burnin
    results = {n.name: _node_result(n, raw[n.name]) for n in nodes}
    stats = judge(results, {n.name: spec.floors(n.gpu_model) for n in nodes}, policy.fleet_tolerance,
                  policy.min_loss_drop, {m: policy.storage_tolerance for m in STORAGE_METRICS})
    first = raw[nodes[0].name]  # the collective figures are the same on every rank
    fleet_info = {
        "nodes": len(nodes), "fleet_tolerance": policy.fleet_tolerance,
        "rule": "fail when more than fleet_tolerance below the fleet median; robust z (MAD) reported, not a rule"
                " on its own",
        "stats": stats, "allreduce": first["allreduce"], "allreduce_ranks": len(nodes),
        "allreduce_backend": "gloo", "link_rate_gbit_s": spec.fabric.link_speed_gbps,
        "memcpy_counting": "read+write (2 x bytes per copy, like a device-to-device copy)",
        "phase_s": {k: round(v, 3) for k, v in first["phase_s"].items()},
        "gemm_size": policy.gemm_size, "repeats": policy.repeats, "train_steps": policy.train_steps,
        "storage": {"bytes": policy.storage_bytes, "files": policy.storage_files,
                    "tolerance": policy.storage_tolerance,
                    "counting": "write: sequential 1 MiB blocks to the end of fsync; read: after dropping the "
                                "file from the page cache; metadata: create + stat + unlink per second"},
    }
    return BurninReport(spec.name, results, fleet_info, duration_s)


def _follow_until_done(fleet: _Fleet, bar, deadline: float, timeout_s: float) -> None:
    while True:
        try:
            event = fleet.events.get(timeout=0.1)
        except queue.Empty:
            event = None
        if event and event["event"] == "exit":
            if event["code"] != 0:
                raise BurninError(f"burn-in process of node {event['node']} died (exit code {event['code']}):"
                                  f" {fleet.log_tail(event['node'])}")
        elif event:
            if bar:
                bar.update(bar.task_ids[0], advance=1 if event["event"] != "done" else 0,
                           description=_describe(event))
            continue
        code = fleet.proc.poll()
        if code is not None and fleet.events.empty():
            if code != 0:
                raise BurninError(f"burn-in processes ended with exit code {code}: {fleet.log_tail(None)}")
            return
        if time.monotonic() > deadline:
            raise BurninError(f"burn-in timed out after {timeout_s:.0f} s (nodes still running were stopped)")


def _node_result(node, raw: dict) -> NodeResult:
    metrics = dict(raw["metrics"])
    errors = list(raw["errors"])
    if raw["allreduce"]:
        metrics["allreduce_busbw_gbps"] = raw["allreduce"][-1]["busbw_gbps"]
    else:  # an empty sweep checks nothing: it must not pass as "every all_reduce was correct"
        errors.append("the all_reduce sweep measured no size")
    return NodeResult(node=node.name, gpu_model=node.gpu_model, spare=node.spare, metrics=metrics,
                      gpus=raw["gpus"], training=raw["training"], allreduce_correct=raw["allreduce_correct"],
                      errors=errors)


def _certify(audit: AuditLog, report: BurninReport) -> None:
    actor = default_actor("burnin")
    for name, n in report.nodes.items():
        reason = "passed burn-in" if n.passed else "failed burn-in: " + "; ".join(n.reasons)
        training = {k: v for k, v in n.training.items() if k != "step_losses"}
        audit.append("burnin.certificate", reason, actor=actor, node=name, payload={
            "verdict": "pass" if n.passed else "fail", "reasons": n.reasons, "notes": n.notes,
            "metrics": n.metrics, "robust_z": n.robust_z, "gpus": n.gpus, "training": training,
            "allreduce_correct": n.allreduce_correct, "errors": n.errors, "spare": n.spare,
            "fleet": {k: report.fleet[k] for k in ("stats", "fleet_tolerance", "allreduce", "link_rate_gbit_s",
                                                   "memcpy_counting")},
        })
