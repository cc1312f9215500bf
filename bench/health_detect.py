"""Detection latency and cost of the watch agent, as the lab runs it.

Starts `aidc agent run` (the sim backend, a metrics server, the lab stack's poll interval)
as its own process on a simulated node with `--gpus` GPUs, measures its CPU and memory
while it watches an idle node, then writes `--samples` XID faults one at a time and reads
each fault event's `created_at` from the store. `--source kmsg`: a kernel-log line (the
default); `--source device`: the driver's XID event only (NVML's event set; the sim's
state file). Prints detect_ms_p50/p99, agent_cpu_pct (of one core, idle watching) and
agent_rss_mb. Usage: python bench/health_detect.py --gpus 8 [--samples 50] [--json]
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

AGENTS = Path(__file__).resolve().parents[1] / "agents"
sys.path.insert(0, str(AGENTS))

from aidc import polling  # noqa: E402
from aidc.device.sim import create_node, inject  # noqa: E402
from aidc.spec import load_stack  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--poll", type=float, default=load_stack("lab").agent.poll_interval_s,
                    help="Telemetry poll interval in seconds (default: the lab stack's agent.poll_interval_s).")
    ap.add_argument("--idle", type=float, default=10.0, help="Seconds of idle watching to measure CPU over.")
    ap.add_argument("--source", choices=("kmsg", "device"), default="kmsg")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        node = create_node(tmp / "n1", "n1", gpus=args.gpus)
        env = {**os.environ, "PYTHONPATH": f"{AGENTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        stderr = open(tmp / "agent.err", "w+")
        agent = subprocess.Popen(
            [sys.executable, "-m", "aidc", "agent", "run", "--node", "n1", "--backend", "sim", "--node-dir",
             str(node), "--store", str(tmp / "store.db"), "--audit-db", str(tmp / "audit.db"),
             "--listen-address", f"127.0.0.1:{polling.free_port()}", "--poll-interval", str(args.poll), "--device-timeout", "5"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
        try:
            polling.wait_for("the agent to start", lambda: "watching" in (tmp / "agent.err").read_text()
                             or agent.poll() is not None, 60)
            if agent.poll() is not None:
                print((tmp / "agent.err").read_text(), file=sys.stderr)
                return 1
            time.sleep(1.0)  # past startup (imports, the first poll)
            cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
            time.sleep(args.idle)
            cpu_pct = 100 * (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
            rss_mb = memory_mb(agent.pid, "VmRSS")
            db = sqlite3.connect(tmp / "store.db", timeout=30)
            latencies = []
            for i in range(args.samples):
                before = db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
                if args.source == "kmsg":
                    with open(node / "kern.log", "a") as log:
                        written = time.time()
                        log.write(f"[{1000 + i:12.6f}] NVRM: Xid (PCI:0000:17:00): 13, pid={i}, name=python, "
                                  f"Ch 00000008\n")
                else:
                    written = inject(node, "xid", 0, xid=13, kernel_line=False)["written_at"]
                deadline = time.monotonic() + 10
                row = None
                while time.monotonic() < deadline and row is None:
                    row = db.execute("SELECT created_at FROM events WHERE id > ? ORDER BY id LIMIT 1",
                                     (before,)).fetchone()
                    time.sleep(0.002)
                if row is None:
                    print(f"sample {i}: no event within 10 s", file=sys.stderr)
                    return 1
                latencies.append((row[0] - written) * 1000)
                time.sleep(random.uniform(0.05, 0.3))  # writes fall anywhere in the telemetry cycle
            peak_rss_mb = memory_mb(agent.pid, "VmHWM")
            db.close()
        finally:
            polling.stop_process_group(agent)
            stderr.close()
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    result = {"gpus": args.gpus, "source": args.source, "samples": len(latencies),
              "poll_interval_ms": args.poll * 1000, "detect_ms_p50": round(p50, 1), "detect_ms_p99": round(p99, 1),
              "agent_cpu_pct": round(cpu_pct, 2), "agent_rss_mb": round(rss_mb, 1),
              "agent_peak_rss_mb": round(peak_rss_mb, 1), "load_average_1m": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.source} fault -> store event, {len(latencies)} samples, {args.gpus} simulated GPUs, telemetry "
              f"every {args.poll * 1000:.0f} ms: p50 {p50:.1f} ms, p99 {p99:.1f} ms; agent {cpu_pct:.2f}% of one "
              f"core idle, RSS {rss_mb:.1f} MB (peak {peak_rss_mb:.1f} MB), load {result['load_average_1m']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
