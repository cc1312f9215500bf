#!/usr/bin/env python3
"""Failover figures over many injections in one lab: detect_ms, resume_s, steps_lost.

One lab (no burn-in), training that never ends by itself, then N rounds of: inject
XID 79 into a training node (rotating through the ranks), measure, repair the node
and bring it back as the new warm spare. Prints p50/p99 and writes JSON.

    .venv/bin/python bench/lab_failover.py --injections 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))

from aidc.lab.run import LabRun, _read_jsonl, _wait  # noqa: E402
from aidc.spec import load_stack  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--injections", type=int, default=20)
    p.add_argument("--steps-between", type=int, default=10, help="training steps between injections")
    p.add_argument("--lab-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()

    spec = load_stack("lab")
    spec = spec.model_copy(update={"lab": spec.lab.model_copy(update={"train_steps": 1_000_000})})
    lab_dir = args.lab_dir or Path(tempfile.mkdtemp(prefix="aidc-bench-failover-")) / "lab"
    run = LabRun(spec, "lab", lab_dir, progress=lambda m: print(m, flush=True))
    rows = []
    try:
        run.bring_up(burn_in=False)
        run.start_training()
        for i in range(args.injections):
            target = _read_jsonl(run.steps_log)[-1]["step"] + args.steps_between
            last = _wait(f"step {target}", lambda: next((s for s in reversed(_read_jsonl(run.steps_log))
                                                        if s["step"] >= target), None), 120)
            victim = last["world"][i % len(last["world"])]
            m = run.inject_and_measure(victim, 79)
            rows.append(m)
            print(f"[{i + 1}/{args.injections}] {victim}: detect {m['detect_ms']} ms, resume {m['resume_s']} s,"
                  f" lost {m['steps_lost']}", flush=True)
            run.return_to_service(victim)
    finally:
        run.cluster.stop()
    detect = [r["detect_ms"] for r in rows]
    resume = [r["resume_s"] for r in rows]
    lost = [r["steps_lost"] for r in rows]
    summary = {
        "injections": len(rows),
        "detect_ms": {"p50": pct(detect, 50), "p99": pct(detect, 99), "max": max(detect)},
        "resume_s": {"p50": pct(resume, 50), "p99": pct(resume, 99), "min": min(resume), "max": max(resume),
                     "under_5s": sum(r < 5 for r in resume)},
        "steps_lost": {"max": max(lost), "mean": round(statistics.mean(lost), 2),
                       "histogram": {str(k): lost.count(k) for k in sorted(set(lost))}},
        "runs": rows,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
