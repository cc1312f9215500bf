"""Run a lab burn-in: one process per node on this machine, gloo on 127.0.0.1 or, on the
lab's netns fabric (`aidc.lab.fabric`), each node in its namespace with gloo over its rails.

The runner holds the rendezvous store itself (a TCPStore bound to a free port chosen by
the kernel, so no port race: on loopback, or on the fabric's management bridge inside
the lab's switch namespace), starts the node processes (forked by
`aidc.burnin.zygote`, in a session of their own), follows their progress on one pipe,
and on any failure or timeout kills the whole session (no orphans). Then it judges
the fleet and appends one certificate per node to the audit log.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from aidc.audit.log import AuditLog, default_actor
from aidc.burnin.collectives import COLLECTIVES, metric_name, node_busbw, sweep_sizes, with_link_fraction
from aidc.burnin.judge import judge
from aidc.burnin.launch.store import keyed_store, store_secret
from aidc.burnin.progress import BurninProgress, rich_bar
from aidc.burnin.report import BurninReport, NodeResult
from aidc.burnin.rundir import run_directory
from aidc.burnin.storage import STORAGE_METRICS
from aidc.burnin.suite import ALL as ALL_TESTS, collectives_of, select as select_tests
from aidc.burnin.worker import PREFIX
from aidc.errors import BurninError
from aidc.files import shared_opener, write_atomic
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
        with open(self.tmpdir / "zygote.log", "wb", opener=shared_opener) as log:
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


def _progress(progress, *, nodes: int, repeats: int, sizes: list[int], train_steps: int) -> BurninProgress | None:
    """`progress`: True for a bar on the terminal's stderr, a function for lines of text (the
    lab's output), false for silence."""
    if not progress:
        return None
    counts = {"nodes": nodes, "repeats": repeats, "sizes": sizes, "collectives": COLLECTIVES,
              "train_steps": train_steps, "modes": len(TRAINING_MODES)}
    if callable(progress):
        return BurninProgress(**counts, say=progress)
    p = BurninProgress(**counts)
    p.bar = rich_bar(p.total)
    return p


def spec_link_rate_gbps(spec: ClusterSpec) -> float:
    """One rank's link rate in GB/s, what busbw is compared with: the spec's `fabric.link_speed_gbps`
    (Gb/s) / 8. A lab fabric that shapes its links to a scaled rate passes that rate to
    `run_burnin(link_rate_gbps=...)` instead."""
    return spec.fabric.link_speed_gbps / 8


TRAINING_MODES = ("ddp", "fsdp", "pipeline")


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


def _link_rate_gbit_s(spec: ClusterSpec, fabric) -> float:
    """The per-rail link rate (Gb/s, bits) every collective's busbw is judged against: on the lab's
    netns fabric the scaled rate the rails are shaped to, else the spec's link speed."""
    return fabric.link_rate_gbps if fabric is not None else spec.fabric.link_speed_gbps


def _fabric_config(spec: ClusterSpec, fabric, node: str, names: list[str]) -> dict:
    """What a worker needs to run on the fabric: where the store is, which interfaces, the link rate."""
    policy = spec.policy.burnin
    common = {"link_rate_gbit_s": _link_rate_gbit_s(spec, fabric), "nodes": names,
              "localise_below_fraction": policy.localise_below_fraction, "localise_tolerance": policy.fleet_tolerance,
              "pair_timeout_s": PAIR_TIMEOUT_S}
    if fabric is None:
        return {**common, "store_host": "127.0.0.1", "gloo_ifnames": "lo", "rails": 0, "netns": None}
    return {**common, "store_host": fabric.store_addr, "gloo_ifnames": ",".join(fabric.ifnames),
            "rails": fabric.rails, "netns": fabric.nodes[node].netns}


def _links_down(fabric) -> dict[str, str]:
    """Nodes with a rail down, and why: they cannot take part in a collective (it would only
    wait for them until its timeout), so they fail with that reason and the rest go on."""
    if fabric is None:
        return {}
    from aidc.lab.fabric import link_states

    return {node: "; ".join(f"{node} rail {r}: link down (rail{r} has no carrier)" for r, up in rails.items() if not up)
            for node, rails in link_states(fabric).items() if not all(rails.values())}


def _start_store(fabric, timeout_s: float):
    """The rendezvous store, where every node can reach it: on loopback, or on the fabric's
    management bridge inside the lab's switch namespace (never on a rail, so a rail fault
    cannot cut a node off the rendezvous), listening on that address only."""
    from aidc.burnin.launch.store import listening_store  # torch, for the store only: the parent computes nothing

    if fabric is None:
        return listening_store("127.0.0.1", timeout_s)
    from aidc.lab.fabric import in_netns

    return in_netns(fabric.switch_ns, lambda: listening_store(fabric.store_addr, timeout_s))


PAIR_TIMEOUT_S = 30.0  # one pair test on a dead link gives up after this


def node_config(spec: ClusterSpec, node, rank: int, names: list[str], *, timeout_s: float,
                target_sample_s: float = 0.02, node_dir: Path | None = None, soak_s: float = 0.0,
                tests: tuple[str, ...] = ALL_TESTS) -> dict:
    """The node program's work for one node (aidc.burnin.worker), whoever launches it: what to
    measure and against what; the launcher adds where the store is and where the result goes.
    `node_dir`: the simulated node's directory (sim backend), else the stack's own devices.
    `tests`: the burn-in tests to run (aidc.burnin.suite), every one by default."""
    policy = spec.policy.burnin
    if node_dir is not None:
        device = {"backend": "sim", "backend_kwargs": {"node_dir": str(node_dir)},
                  # The lab node's own directory stands in for its mount of the spec's checkpoint path.
                  "storage_path": str(Path(node_dir) / "checkpoints")}
    else:  # a GPU node: its NVML devices, NCCL between nodes, the spec's checkpoint volume
        device = {"backend": spec.device_backend, "backend_kwargs": {}, "collective_device": "cuda:0",
                  "storage_path": spec.storage.checkpoints.mount_path}
    return {"rank": rank, "world": len(names), "node": node.name, **device,
            "device_timeout_s": spec.agent.device_timeout_s, "pg_timeout_s": timeout_s,
            "gemm_size": policy.gemm_size, "repeats": policy.repeats, "memcpy_bytes": policy.memcpy_bytes,
            "target_sample_s": target_sample_s,
            "sizes": sweep_sizes(policy.allreduce_min_bytes, policy.allreduce_max_bytes),
            "train_steps": policy.train_steps,
            "storage_bytes": policy.storage_bytes, "storage_files": policy.storage_files,
            # Half the run's time: the peers wait in a barrier that expires with the whole run.
            "dcgm_diag_level": policy.dcgm_diag_level, "dcgm_timeout_s": timeout_s / 2,
            "soak_s": soak_s, "tests": list(tests)}


def run_burnin(spec: ClusterSpec, node_dirs: dict[str, Path] | None, audit: AuditLog | None = None,
               progress: bool | Callable[[str], None] = False, *, timeout_s: float = 300.0,
               corrupt_nodes: frozenset[str] = frozenset(),
               target_sample_s: float = 0.02, fabric=None, join_timeout_s: float | None = None,
               link_rate_gbps: float | None = None, known_answers: dict[str, dict[str, str]] | None = None,
               soak_s: float = 0.0, only: frozenset[str] | None = None,
               baselines: dict[str, dict[str, float]] | None = None,
               tests: list[str] | tuple[str, ...] | None = None) -> BurninReport:
    """Burn in every node of the spec (spares included) on this machine; judge; certify.

    `node_dirs` maps node name -> simulated node directory (sim backend). `corrupt_nodes`
    is lab fault injection: those nodes flip one parameter bit after training, which the
    silent-data-corruption check must catch. `fabric` (aidc.lab.fabric.Fabric): run each
    node in its namespace and the collectives over its rails. `link_rate_gbps` (GB/s) is what
    busbw is judged against; default the fabric's scaled rail rate, else `spec_link_rate_gbps`.
    `known_answers` ({key: {check: sha256}}, aidc.burnin.answers.load_all): what each GPU's
    seeded results are held to; default the packaged ones (the run's GPUs vote where none is stored).
    `soak_s`: hold GEMM load on every GPU that long and judge its clocks (aidc.burnin.soak); the
    soak's time is added to `timeout_s`. `progress`: True for a bar on stderr, a function to
    get a line per phase and every few seconds (aidc.burnin.progress).
    A node that has not joined the rendezvous within `join_timeout_s` is named in the
    BurninError. `only`: burn in just these nodes (`aidc burnin run --nodes`). `baselines`: the
    stored per-GPU-model figures every node is also held to (aidc.burnin.baseline). `tests`: run and
    judge only these burn-in tests (aidc.burnin.suite; None: all, as `aidc burnin run`). Raises BurninError
    when the run cannot complete (recorded in the audit log as `burnin.aborted`); failed nodes are
    verdicts.
    """
    tests = select_tests(tests)  # an unknown name is an error before anything starts
    all_nodes = [n for n in spec.nodes() if only is None or n.name in only]
    down = _links_down(fabric)
    nodes = [n for n in all_nodes if n.name not in down]
    join_timeout_s = min(timeout_s, 60.0) if join_timeout_s is None else join_timeout_s
    if not timeout_s > 0:
        raise BurninError(f"the burn-in timeout must be positive, got {timeout_s:g} s")
    if spec.device_backend != "sim":
        raise BurninError("run_burnin runs a fleet of simulated nodes on one machine; the stack uses the"
                          f" {spec.device_backend!r} backend (use bench/gpu_check.sh on a GPU machine)")
    missing = [n.name for n in all_nodes if not node_dirs or n.name not in node_dirs]
    if missing:
        raise BurninError(f"no node directory for {', '.join(missing)} (create them with aidc.device.sim.create_node)")
    if known_answers is None:  # read before the run: a bad file is an error now, not after it
        from aidc.burnin.answers import load_all

        known_answers = load_all(None)
    if not soak_s >= 0:
        raise BurninError(f"the soak must be 0 (none) or a positive number of seconds, got {soak_s:g}")
    timeout_s += soak_s  # the soak is time asked for, not a hang
    started = time.monotonic()
    policy = spec.policy.burnin
    sizes = sweep_sizes(policy.allreduce_min_bytes, policy.allreduce_max_bytes)
    if link_rate_gbps is None:  # GB/s, as busbw: the netns fabric's rails carry a scaled rate
        link_rate_gbps = _link_rate_gbit_s(spec, fabric) / 8
    link_rate = link_rate_gbps
    if not link_rate > 0:
        raise BurninError(f"the link rate must be positive, got {link_rate:g} GB/s")
    bar = _progress(progress, nodes=len(nodes), repeats=policy.repeats, sizes=sizes, train_steps=policy.train_steps)
    with run_directory("lab") as tmpdir:
        fleet = _Fleet(tmpdir)
        try:
            if not nodes:
                raise BurninError("no node can take part: " + "; ".join(down.values()))
            fleet.start()  # the zygote imports torch while this process does the same for the store
            store, secret = _start_store(fabric, timeout_s), store_secret()
            names = [n.name for n in nodes]
            configs = {}
            for rank, node in enumerate(nodes):
                cfg = {**node_config(spec, node, rank, names, timeout_s=timeout_s, target_sample_s=target_sample_s,
                                     node_dir=node_dirs[node.name], soak_s=soak_s, tests=tests),
                       "store_port": store.port, "store_prefix": secret,
                       "corrupt_parameters": node.name in corrupt_nodes,
                       "result_path": str(tmpdir / f"{node.name}.result.json"),
                       **_fabric_config(spec, fabric, node.name, names)}
                configs[node.name] = tmpdir / f"{node.name}.json"
                write_atomic(configs[node.name], json.dumps(cfg))  # 0600 in a 0700 directory: it holds the secret
            fleet.release(configs)
            joins = _JoinWatch(keyed_store(store, secret), names, join_timeout_s, fleet)
            _follow_until_done(fleet, bar, started + timeout_s, timeout_s, joins)
            raw = {}
            for node in nodes:
                path = tmpdir / f"{node.name}.result.json"
                if not path.exists():
                    raise BurninError(f"node {node.name} exited without a result: {fleet.log_tail(node.name)}")
                raw[node.name] = json.loads(path.read_text())
        except BurninError as exc:
            # A rail that went down mid-run shows only as a collective's timeout: say which.
            went_down = {n: why for n, why in _links_down(fabric).items() if n not in down}
            if went_down:
                exc = BurninError(f"{exc}; rails down now: {'; '.join(went_down.values())}")
            record_abort(audit, exc, [n.name for n in all_nodes], timeout_s)
            raise exc from None
        finally:
            fleet.stop_all()
            if bar:
                bar.stop()
    report = _judged_report(spec, nodes, raw, time.monotonic() - started, link_rate, fabric=fabric, down=down,
                            all_nodes=all_nodes, known_answers=known_answers, baselines=baselines, tests=tests)
    if audit is not None:
        _certify(audit, report)
    return report


def record_abort(audit: AuditLog | None, exc: BurninError, nodes: list[str], timeout_s: float,
                 launcher: dict | None = None) -> None:
    """An aborted burn-in is a result too: no node was certified, and the log says why."""
    if audit is not None:
        audit.append("burnin.aborted", str(exc)[:2000], actor=default_actor("burnin"),
                     payload={"nodes": nodes, "timeout_s": timeout_s,
                              "launcher": launcher or {"name": "lab", "job_id": None}})


def _judged_report(spec: ClusterSpec, nodes: list, raw: dict[str, dict], duration_s: float, link_rate: float, *,
                   fabric=None, down: dict[str, str] | None = None, all_nodes: list | None = None,
                   known_answers: dict[str, dict[str, str]] | None = None,
                   baselines: dict[str, dict[str, float]] | None = None,
                   tests: tuple[str, ...] = ALL_TESTS) -> BurninReport:
    policy = spec.policy.burnin
    results = {n.name: _node_result(n, raw[n.name], link_rate, tests) for n in nodes}
    first = raw[nodes[0].name]  # the slowest-rank figures are the same on every rank
    localisation = first.get("localisation") or {}
    culprits = localisation.get("culprits", [])
    stats = judge(results, {n.name: spec.floors(n.gpu_model) for n in nodes}, policy.fleet_tolerance,
                  policy.min_loss_drop, link_rate_gbps=link_rate, min_busbw_fraction=policy.min_busbw_fraction,
                  busbw_tolerance=policy.busbw_fleet_tolerance,
                  metric_tolerance={m: policy.storage_tolerance for m in STORAGE_METRICS},
                  bad_link_on={c["node"] for c in culprits}, known_answers=known_answers,
                  soak_max_clock_sag=policy.soak_max_clock_sag, baselines=baselines)
    for culprit in culprits:  # a named bad link fails its node
        results[culprit["node"]].reasons.append(culprit["reason"])
        results[culprit["node"]].passed = False
    for unresolved in localisation.get("unresolved", []):  # evidence on both ends, no verdict
        for name in (unresolved["a"], unresolved["b"]):
            results[name].notes.append(unresolved["note"])
    step_times = {mode: statistics.median(times) for mode in TRAINING_MODES
                  if (times := [r.step_time_ms(mode) for r in results.values() if r.step_time_ms(mode) is not None])}
    for n in all_nodes or nodes:  # a node with a rail down took part in nothing: that is its verdict
        if n.name in (down or {}):
            results[n.name] = NodeResult(node=n.name, gpu_model=n.gpu_model, spare=n.spare, passed=False,
                                         reasons=[down[n.name]], notes=["not measured: a rail is down"],
                                         tests=list(tests))
    results = {n.name: results[n.name] for n in all_nodes or nodes}
    fleet_info = {
        "nodes": len(nodes), "tests": list(tests), "fleet_tolerance": policy.fleet_tolerance,
        "rule": "fail when more than fleet_tolerance below the fleet median; robust z (MAD) reported, not a rule"
                " on its own",
        "stats": stats, "collectives": {op: with_link_fraction(rows, link_rate) for op, rows in
                                        first.get("collectives", {}).items()},
        "collective_ranks": len(nodes), "collective_backend": "gloo", "link_rate_gbps": link_rate,
        "link_rate_gbit_s": link_rate * 8, "min_busbw_fraction": policy.min_busbw_fraction,
        "busbw_fleet_tolerance": policy.busbw_fleet_tolerance,
        "step_time_ms": step_times,
        "fabric": ({"kind": "netns", "rails": fabric.rails, "spec_link_gbps": fabric.spec_link_gbps,
                    "scale": fabric.scale, "rail_mbit": fabric.rail_mbit} if fabric is not None
                   else {"kind": spec.fabric.kind if spec.fabric.kind != "netns" else "loopback", "rails": 0}),
        "localisation": first.get("localisation"),  # None where it did not run
        "memcpy_counting": "read+write (2 x bytes per copy, like a device-to-device copy)",
        "phase_s": {k: round(v, 3) for k, v in first["phase_s"].items()},
        "gemm_size": policy.gemm_size, "repeats": policy.repeats, "train_steps": policy.train_steps,
        "floors": {n.name: spec.floors(n.gpu_model) for n in nodes},
        "baselines": {n.name: (baselines or {}).get(n.gpu_model, {}) for n in nodes},
        "storage": {"bytes": policy.storage_bytes, "files": policy.storage_files,
                    "tolerance": policy.storage_tolerance,
                    "counting": "write: sequential 1 MiB blocks to the end of fsync; read: after dropping the "
                                "file from the page cache; metadata: create + stat + unlink per second"},
    }
    return BurninReport(spec.name, results, fleet_info, duration_s)


class _JoinWatch:
    """Names the nodes that never reach the rendezvous: without this every other node would
    wait for them in init_process_group until the whole run's timeout, and say nothing."""

    def __init__(self, store, names: list[str], timeout_s: float, fleet: "_Fleet"):
        self.store, self.pending, self.timeout_s, self.fleet = store, list(names), timeout_s, fleet
        self.deadline: float | None = None  # set when the node processes exist (importing torch is not joining)

    def started(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def check(self) -> None:
        if not self.pending or self.deadline is None:
            return
        self.pending = [n for n in self.pending if not self.store.check([f"joined/{n}"])]
        if self.pending and time.monotonic() > self.deadline:
            tails = "; ".join(f"{n}: {self.fleet.log_tail(n, 300)}" for n in self.pending)
            raise BurninError(f"node(s) {', '.join(self.pending)} never joined the burn-in rendezvous within"
                              f" {self.timeout_s:g} s (the others were stopped): {tails}")


def next_event(events: queue.Queue, wait_s: float, bar: BurninProgress | None) -> dict | None:
    """The fleet's next event, or None after `wait_s` without one; the progress sees both
    (a None lets it remind the user that a long phase is still going)."""
    try:
        event = events.get(timeout=wait_s)
    except queue.Empty:
        event = None
    if bar:
        bar.observe(event)
    return event


def _follow_until_done(fleet: _Fleet, bar, deadline: float, timeout_s: float, joins: _JoinWatch | None = None) -> None:
    while True:
        if joins is not None:
            joins.check()
        event = next_event(fleet.events, 0.1, bar)
        if event and event["event"] == "exit":
            if event["code"] != 0:
                raise BurninError(f"burn-in process of node {event['node']} died (exit code {event['code']}):"
                                  f" {fleet.log_tail(event['node'])}")
        elif event and event["event"] == "forked":
            if joins is not None:
                joins.started()
        elif event:
            continue
        code = fleet.proc.poll()
        if code is not None and fleet.events.empty():
            if code != 0:
                raise BurninError(f"burn-in processes ended with exit code {code}: {fleet.log_tail(None)}")
            return
        if time.monotonic() > deadline:
            raise BurninError(f"burn-in timed out after {timeout_s:.0f} s (nodes still running were stopped)")


def _node_result(node, raw: dict, link_rate: float, tests: tuple[str, ...] = ALL_TESTS) -> NodeResult:
    metrics = dict(raw["metrics"])
    errors = list(raw["errors"])
    collectives = {}
    for op in collectives_of(tests):
        rows = with_link_fraction(raw.get("collectives", {}).get(op, []), link_rate, own=True)
        if rows:  # over the sweep's largest sizes, on this node's own clock
            metrics[metric_name(op)] = node_busbw(rows)
            collectives[op] = rows
        else:  # an empty sweep checks nothing: it must not pass as "every result was correct"
            errors.append(f"the {op} sweep measured no size")
    return NodeResult(node=node.name, gpu_model=node.gpu_model, spare=node.spare, metrics=metrics,
                      gpus=raw["gpus"], training=raw["training"], parallel=raw.get("parallel", {}),
                      collectives=collectives, errors=errors, dcgm=raw.get("dcgm", {}),
                      soak=raw.get("soak", {}), tests=list(tests))


def _certify(audit: AuditLog, report: BurninReport, launcher: dict | None = None) -> None:
    """One certificate per node; `launcher` ({name, job_id}) says how its node program ran."""
    launcher = launcher or {"name": "lab", "job_id": None}
    actor = default_actor("burnin")
    for name, n in report.nodes.items():
        reason = "passed burn-in" if n.passed else "failed burn-in: " + "; ".join(n.reasons)
        training = {k: v for k, v in n.training.items() if k != "step_losses"}
        parallel = {mode: {k: v for k, v in run.items() if k != "step_losses"} for mode, run in n.parallel.items()}
        audit.append("burnin.certificate", reason, actor=actor, node=name, payload={
            "verdict": "pass" if n.passed else "fail", "reasons": n.reasons, "notes": n.notes,
            "metrics": n.metrics, "robust_z": n.robust_z, "gpus": n.gpus, "training": training,
            "parallel": parallel, "collectives": n.collectives, "link_rate_gbps": report.fleet["link_rate_gbps"],
            "errors": n.errors, "spare": n.spare, "failed_gpus": n.failed_gpus, "dcgm": n.dcgm,
            "soak": n.soak, "launcher": launcher, "tests": n.tests,
            "floors": report.fleet["floors"].get(name, {}),  # what the report draws each figure against
            "baseline": report.fleet.get("baselines", {}).get(name, {}),
            "fleet": {k: report.fleet[k] for k in ("stats", "fleet_tolerance", "link_rate_gbit_s", "min_busbw_fraction",
                                                   "step_time_ms", "memcpy_counting", "fabric")},
            "localisation": [c for c in (report.fleet.get("localisation") or {}).get("culprits", [])
                             if c["node"] == name],
        })
