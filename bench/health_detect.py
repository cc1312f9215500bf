"""Detection latency of the watch agent: kernel-log line written -> fault event in the store.

Runs one agent (in this process, on a simulated node) at the lab's poll interval, writes
N XID lines to the node's kernel log one at a time, and reads each event's `created_at`
from the store. Prints p50/p99 in ms and as a ratio to the poll interval (the target is
about one interval). Usage: python bench/health_detect.py [--samples 20] [--poll 0.05]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))

from aidc.device.sim import SimBackend, create_node  # noqa: E402
from aidc.health.agent import run_agent  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--poll", type=float, default=0.05)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        node = create_node(tmp / "n1", "n1", gpus=2)
        stop, ready = threading.Event(), threading.Event()
        t = threading.Thread(target=run_agent, args=("n1", SimBackend(node), node / "kern.log", tmp / "store.db",
                                                     tmp / "audit.db", None, args.poll, stop),
                             kwargs={"device_timeout_s": 5.0, "ready": ready}, daemon=True)
        t.start()
        ready.wait(30)
        db = sqlite3.connect(tmp / "store.db", timeout=30)
        latencies = []
        try:
            for i in range(args.samples):
                before = db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
                with open(node / "kern.log", "a") as log:
                    written = time.time()
                    log.write(f"[{1000 + i:12.6f}] NVRM: Xid (PCI:0000:17:00): 13, pid={i}, name=python, Ch 00000008\n")
                deadline = time.monotonic() + 10
                row = None
                while time.monotonic() < deadline and row is None:
                    row = db.execute("SELECT created_at FROM events WHERE id > ? ORDER BY id LIMIT 1",
                                     (before,)).fetchone()
                    time.sleep(0.005)
                if row is None:
                    print(f"sample {i}: no event within 10 s", file=sys.stderr)
                    return 1
                latencies.append((row[0] - written) * 1000)
                time.sleep(args.poll * 1.37)  # decorrelate writes from the poll phase
        finally:
            stop.set()
            t.join(15)
    lat = sorted(latencies)
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    result = {"samples": len(lat), "poll_interval_ms": args.poll * 1000, "detect_ms_p50": round(p50, 1),
              "detect_ms_p99": round(p99, 1), "p50_over_poll": round(p50 / (args.poll * 1000), 2),
              "p99_over_poll": round(p99 / (args.poll * 1000), 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"kernel-log line -> store event, {len(lat)} samples, poll {args.poll * 1000:.0f} ms: "
              f"p50 {p50:.1f} ms ({result['p50_over_poll']}x poll), p99 {p99:.1f} ms ({result['p99_over_poll']}x poll)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
