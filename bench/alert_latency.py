#!/usr/bin/env python3
"""Alert-to-quarantine latency through the real path, beside the agent's direct path.

Real path: a GPU falls off the bus on a lab node -> the node agent's metrics (aidc_gpu_lost)
-> Prometheus (1 s scrape/eval) -> alert AidcGpuFallenOffBus -> Alertmanager (group_wait 0s)
-> `aidc runbook serve` -> runbook gpu-fallen-off-bus (its confirm check and quarantine
steps) -> lab scheduler quarantine. Measured: fault written -> quarantine file written.
Direct path: the same fault -> the agent's fault event in its durable store (what the
agent's own failover acts on; the lab loop's `detect_ms`).

Both are measured in the same run, on the same injections, and printed side by side.
Needs Debian's `prometheus` and `prometheus-alertmanager` and the node agent (`aidc agent run`).

    PYTHONPATH=agents .venv/bin/python bench/alert_latency.py [--injections 10] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agents"))
os.environ.setdefault("AIDC_ROOT", str(ROOT))
os.environ["PYTHONPATH"] = str(ROOT / "agents") + os.pathsep + os.environ.get("PYTHONPATH", "")

import yaml  # noqa: E402

from aidc import polling  # noqa: E402
from aidc.device.sim import create_node, inject  # noqa: E402
from aidc.failover.scheduler import LabScheduler  # noqa: E402
from aidc.runbook.promstack import PromStack, free_port, missing_binaries  # noqa: E402

NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]
WATCHED = ["gpu-0", "gpu-1"]  # two agents: light enough for 2 cores
TOKEN = "bench-token"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 10 samples p99 is the maximum, as it should be)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    return polling.wait_for(what, predicate, timeout, interval)


def bench_runbook(directory: Path) -> None:
    """The shipped runbook up to its quarantine, without the cooldown (one node is hit repeatedly)."""
    doc = yaml.safe_load((ROOT / "runbooks" / "gpu-fallen-off-bus.yaml").read_text())
    cut = next(i for i, s in enumerate(doc["steps"]) if s["kind"] == "quarantine")
    doc.update(steps=doc["steps"][:cut + 1], cooldown_s=0)
    doc.pop("on_failure", None)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gpu-fallen-off-bus.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def first_event_after(store: Path, t0: float) -> float | None:
    try:
        with sqlite3.connect(store, timeout=5) as db:
            row = db.execute("SELECT created_at FROM events WHERE created_at >= ? ORDER BY id LIMIT 1", (t0,)).fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    polling.stop_process_group(proc)


def run(injections: int, workdir: Path) -> dict:
    lab = workdir / "lab"
    for i, name in enumerate(NODES):
        create_node(lab / "nodes" / name, name, 2, i)
    bench_runbook(workdir / "runbooks")
    (workdir / "token").write_text(TOKEN)
    ports = {n: free_port() for n in WATCHED}
    procs: list[subprocess.Popen] = []
    stack = PromStack(workdir / "prom", ports, ROOT / "runbooks/alerts/aidc-alerts.yml", "", workdir / "token")
    try:
        for node in WATCHED:
            procs.append(spawn([sys.executable, "-m", "aidc", "agent", "run", "--node", node, "--backend", "sim",
                                "--node-dir", str(lab / "nodes" / node), "--kernel-log", str(lab / "nodes" / node / "kern.log"),
                                "--store", str(workdir / f"store-{node}.db"), "--audit-db", str(workdir / f"agent-audit-{node}.db"),
                                "--listen-address", f"127.0.0.1:{ports[node]}", "--poll-interval", "0.05"], workdir / f"agent-{node}.log"))
        serve_port = free_port()
        procs.append(spawn([sys.executable, "-m", "aidc", "runbook", "serve", "--listen-address", f"127.0.0.1:{serve_port}",
                            "--token-file", str(workdir / "token"), "--state-dir", str(lab), "--stack", "lab",
                            "--state-db", str(workdir / "state.db"), "--audit-db", str(workdir / "audit.db"),
                            "--runbooks", str(workdir / "runbooks"), "--prometheus", stack.prometheus_url],
                           workdir / "serve.log"))
        wait_until(lambda: "ready on" in (workdir / "serve.log").read_text(), 60, "the receiver")
        stack.webhook_url = f"http://127.0.0.1:{serve_port}/alerts"
        stack.start()
        wait_until(lambda: stack.targets_up() == len(WATCHED), 60, "Prometheus to scrape the agents", 0.5)
        sched = LabScheduler(lab)
        rows = []
        for i in range(injections):
            node = WATCHED[i % len(WATCHED)]
            qfile = lab / "nodes" / node / "quarantined"
            t0 = inject(lab / "nodes" / node, "fallen_off_bus", gpu=i % 2)["written_at"]
            wait_until(qfile.exists, 60, f"quarantine of {node}")
            quarantined_at = json.loads(qfile.read_text())["at"]
            event_at = wait_until(lambda: first_event_after(workdir / f"store-{node}.db", t0), 30, "the agent's event")
            rows.append({"node": node, "alert_to_quarantine_ms": (quarantined_at - t0) * 1000,
                         "agent_direct_ms": (event_at - t0) * 1000})
            print(f"  injection {i + 1:2d} on {node}: runbook path {rows[-1]['alert_to_quarantine_ms']:7.0f} ms, "
                  f"agent direct {rows[-1]['agent_direct_ms']:6.0f} ms", file=sys.stderr, flush=True)
            # Reset: healthy again, back in service, and the alert no longer firing before the next one.
            inject(lab / "nodes" / node, "clear")
            sched.release(node, "bench reset")
            wait_until(lambda: not stack.query(f'ALERTS{{alertname="AidcGpuFallenOffBus",Hostname="{node}"}}'),
                       60, f"the alert on {node} to resolve", 0.2)
    finally:
        stack.stop()
        for proc in procs:
            stop(proc)
    real = [r["alert_to_quarantine_ms"] for r in rows]
    direct = [r["agent_direct_ms"] for r in rows]
    return {"injections": len(rows), "rows": rows,
            "runbook_path_ms": {"p50": percentile(real, 50), "p99": percentile(real, 99)},
            "agent_direct_ms": {"p50": percentile(direct, 50), "p99": percentile(direct, 99)},
            "ratio_p50": percentile(real, 50) / max(percentile(direct, 50), 1e-9)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--injections", type=int, default=10, help="faults to inject (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = parser.parse_args()
    if missing_binaries():
        print(f"alert_latency: needs {', '.join(missing_binaries())} (make system-deps)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("aidc.health.agent") is None:
        print("alert_latency: agent not yet available (aidc.health.agent)", file=sys.stderr)
        return 2
    if not 1 <= args.injections <= 100:
        print("alert_latency: --injections must be 1..100", file=sys.stderr)
        return 2
    if args.workdir:
        result = run(args.injections, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="aidc-alert-latency-") as tmp:
            result = run(args.injections, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        rp, ad = result["runbook_path_ms"], result["agent_direct_ms"]
        print(f"{result['injections']} injections (fallen off the bus), same run:")
        print(f"  {'path':58s} {'p50 ms':>8s} {'p99 ms':>8s}")
        print(f"  {'Prometheus -> Alertmanager -> runbook -> quarantine':58s} {rp['p50']:8.0f} {rp['p99']:8.0f}")
        print(f"  {'agent direct (fault -> event in its store)':58s} {ad['p50']:8.0f} {ad['p99']:8.0f}")
        print(f"  runbook path / agent direct (p50): {result['ratio_p50']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
