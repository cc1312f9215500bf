"""Detect-to-drain latency across hosts: kernel-log line written on a node -> the controller's
quarantine call, with the event travelling from the node's agent to the controller over HTTPS
with mutual TLS (aidc.transport).

Starts the real processes, as on a cluster: `aidc failover run --listen` (lab scheduler backend,
whose quarantine records when it was called) and one `aidc agent run --controller-url` on a
simulated node with its own store. Each sample: write XID 79 into the node's kernel log
(`aidc device inject`'s code), wait for the quarantine, then clear the fault and release the
node. Prints p50/p99 of the whole path and of its three legs: detect (line -> event in the
agent's store), forward (-> event committed in the controller's store), act (-> quarantine).
Usage: python bench/transport_latency.py [--events 20] [--poll 0.05] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agents"))
sys.path.insert(0, str(ROOT / "tests" / "runbook"))  # the tests' throwaway CA

from aidc import polling  # noqa: E402
from aidc.audit.log import AuditLog  # noqa: E402
from aidc.device.sim import create_node, inject  # noqa: E402
from aidc.failover.controller import FailoverController  # noqa: E402
from aidc.failover.scheduler import LabScheduler  # noqa: E402
from aidc.spec import load_stack  # noqa: E402
from aidc.store import Store  # noqa: E402
from certs import CA  # noqa: E402

NODE = "gpu-1"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "agents")}
    return subprocess.Popen([sys.executable, "-m", "aidc", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def created_at(db: Path, n: int) -> float | None:
    """created_at of the n-th event (1-based) for NODE, or None if not there yet."""
    with sqlite3.connect(db, timeout=10) as conn:
        rows = conn.execute("SELECT created_at FROM events WHERE node = ? ORDER BY id", (NODE,)).fetchall()
    return rows[n - 1][0] if len(rows) >= n else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--poll", type=float, default=load_stack("lab").agent.poll_interval_s,
                    help="the agent's poll interval (default: the lab spec's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ca = CA.create(tmp / "pki", "bench-ca")
        server, client = ca.issue(tmp / "pki", "controller", server=True), ca.issue(tmp / "pki", NODE, server=False)
        lab = tmp / "lab"
        for i, name in enumerate(n.name for n in load_stack("lab").nodes()):
            create_node(lab / "nodes" / name, name, gpus=2, node_index=i)
        node_dir, agent_db, port = lab / "nodes" / NODE, tmp / "agent" / "store.db", polling.free_port()
        procs = [
            start(["failover", "run", "--stack", "lab", "--state-dir", str(lab), "--no-dry-run",
                   "--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                   "--client-ca", str(ca.cert_file)], tmp / "controller.log"),
            start(["agent", "run", "--node", NODE, "--backend", "sim", "--node-dir", str(node_dir),
                   "--store", str(agent_db), "--audit-db", str(tmp / "agent" / "audit.db"), "--port", "0",
                   "--poll-interval", str(args.poll), "--device-timeout", "1.0",
                   "--controller-url", f"https://127.0.0.1:{port}", "--tls-cert", str(client.cert),
                   "--tls-key", str(client.key), "--ca", str(ca.cert_file)], tmp / "agent.log"),
        ]
        spec = load_stack("lab")
        samples = []
        try:
            polling.wait_for("the controller's listener", lambda: "receiving fault events" in
                             (tmp / "controller.log").read_text(), 120)
            polling.wait_for("the agent", lambda: "watching" in (tmp / "agent.log").read_text(), 60)
            releaser = FailoverController(spec, Store(lab / "state.db"), AuditLog(lab / "audit.db"),
                                          LabScheduler(lab), dry_run=False, actor="bench")
            for n in range(1, args.events + 1):
                # A random pause, so each line meets the agent's, the forwarder's and the controller's
                # loops at a random phase (a fixed multiple of their period would measure one phase).
                time.sleep(random.uniform(0.1, 0.3))
                written = time.time()
                inject(node_dir, "xid", 0, xid=79)
                marker = node_dir / "quarantined"
                polling.wait_for(f"quarantine {n}", marker.exists, 30, 0.005)
                quarantined = json.loads(marker.read_text())["at"]
                detected = polling.wait_for("the agent's event", lambda: created_at(agent_db, n), 10)
                arrived = polling.wait_for("the controller's event", lambda: created_at(lab / "state.db", n), 10)
                samples.append({"total_ms": (quarantined - written) * 1000, "detect_ms": (detected - written) * 1000,
                                "forward_ms": (arrived - detected) * 1000, "act_ms": (quarantined - arrived) * 1000})
                inject(node_dir, "clear", 0)
                releaser.release(NODE, "bench: next sample", "bench")
        finally:
            for p in procs:
                polling.stop_process_group(p)
        legs = {k: {"p50": round(statistics.median(s[k] for s in samples), 1),
                    "p99": round(pct([s[k] for s in samples], 0.99), 1)} for k in samples[0]} if samples else {}
        summary = {"events": len(samples), "poll_interval_s": args.poll, **legs}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in legs.items():
            print(f"{k:<11} p50 {v['p50']:8.1f} ms   p99 {v['p99']:8.1f} ms")
        print(f"{len(samples)} samples, agent poll interval {args.poll} s")
    return 0 if len(samples) == args.events else 1


if __name__ == "__main__":
    sys.exit(main())
