#!/usr/bin/env python3
"""Failover figures over many injections in one lab: detect_ms, resume_s, steps_lost.

One lab (no burn-in), training that never ends by itself, then N rounds of: inject
XID 79 into a training node (rotating through the ranks), measure, repair the node
and bring it back as the new warm spare. Prints p50/p99, where the resume time went
(`phases`, seconds from the fault, from the audit log, the store and the workers'
traces), the load average, and writes JSON.

    .venv/bin/python bench/lab_failover.py --injections 20 [--json out.json]
    .venv/bin/python bench/lab_failover.py --phases-of LAB_DIR   # a lab that already ran
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))

from aidc.audit.log import AuditLog  # noqa: E402
from aidc.lab.run import LabRun, _read_jsonl, _wait  # noqa: E402
from aidc.spec import load_stack  # noqa: E402

# The trace lines of the workers (lab/trainer.py) and their agents (lab/node_launcher.py), in
# the order a failover writes them.
WORKER_PHASES = (("worker failed", "survivors_failed"), ("agent rendezvous started", "rendezvous_started"),
                 ("agent rendezvous done", "rendezvous_done"), ("worker started", "workers_started"),
                 ("process group ready", "process_group_ready"), ("checkpoint loaded", "checkpoint_loaded"),
                 ("DDP ready", "ddp_ready"), ("first step done", "first_step_done"))


def _traces(lab_dir: Path) -> list[tuple[float, str, str]]:
    out = []
    for path in (lab_dir / "train").glob("trace-*.log"):
        node = path.stem[len("trace-"):]
        for line in path.read_text().splitlines():
            m = re.match(r"([0-9.]+) pid=[0-9]+ (.*)", line)
            if m:
                out.append((float(m.group(1)), node, m.group(2)))
    return sorted(out)


def phases(lab_dir: Path, t_fault: float, until: float) -> dict:
    """Seconds from the fault to each phase of one failover, the last node's time for each
    worker phase (the step waits for the slowest): the agent's event in the store, the
    controller's decision and action (kill + rendezvous), the survivors' workers failing,
    the new workers starting (rendezvous done), their process group, checkpoint, DDP and
    first step."""
    out: dict[str, float] = {}
    db = sqlite3.connect(lab_dir / "state.db")
    row = db.execute("SELECT MIN(created_at) FROM events WHERE created_at > ?", (t_fault,)).fetchone()
    db.close()
    if row and row[0]:
        out["event_stored"] = row[0] - t_fault
    audit = AuditLog(lab_dir / "audit.db")
    try:
        for kind, name in (("failover.decision", "decided"), ("failover.action", "quarantined")):
            ts = [r.ts for r in audit.records(kind=kind) if t_fault < r.ts < until]
            if ts:
                out[name] = min(ts) - t_fault
    finally:
        audit.close()
    traces = [t for t in _traces(lab_dir) if t_fault < t[0] < until]
    for text, name in WORKER_PHASES:
        ts = [t for t, _node, what in traces if what.startswith(text)]
        if ts:
            out[name] = max(ts) - t_fault
    return {k: round(v, 3) for k, v in out.items()}


def phase_summary(rows: list[dict]) -> dict:
    names = [n for n in ("event_stored", "decided", "quarantined", *(n for _, n in WORKER_PHASES))
             if any(n in r.get("phases", {}) for r in rows)]
    return {n: {"p50": round(pct([r["phases"][n] for r in rows if n in r["phases"]], 50), 3),
                "p99": round(pct([r["phases"][n] for r in rows if n in r["phases"]], 99), 3)} for n in names}


def phases_of(lab_dir: Path) -> list[dict]:
    """The phases of every injection in a lab directory that already ran."""
    audit = AuditLog(lab_dir / "audit.db")
    try:
        faults = sorted(r.payload["written_at"] for r in audit.records(kind="lab.inject"))
    finally:
        audit.close()
    return [{"phases": phases(lab_dir, t, resumed_at(lab_dir, t))} for t in faults]


def resumed_at(lab_dir: Path, t_fault: float) -> float:
    """Just after the first step of the job's next start after the fault: the end of that
    failover's window (a node returned to service later joins on its own time)."""
    start = next((s["t"] for s in _read_jsonl(lab_dir / "train" / "starts.jsonl") if s["t"] > t_fault), None)
    if start is None:
        return float("inf")
    first = next((s["t"] for s in _read_jsonl(lab_dir / "train" / "steps.jsonl") if s["t"] >= start), start)
    return first + 0.5


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--injections", type=int, default=20)
    p.add_argument("--steps-between", type=int, default=10, help="training steps between injections")
    p.add_argument("--lab-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--phases-of", type=Path, default=None, help="only print the phases of this lab directory's run")
    args = p.parse_args()
    if args.phases_of:
        rows = phases_of(args.phases_of)
        for r in rows:
            print(json.dumps(r["phases"]))
        print(json.dumps(phase_summary(rows), indent=1))
        return 0

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
            injected = [r for r in run.audit.records(kind="lab.inject", node=victim)][-1].payload["written_at"]
            m["phases"] = phases(run.cluster.dir, injected, resumed_at(run.cluster.dir, injected))
            m["load_average_1m"] = round(os.getloadavg()[0], 2)
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
        "phases_s": phase_summary(rows),
        "load_average_1m": {"min": min(r["load_average_1m"] for r in rows),
                            "max": max(r["load_average_1m"] for r in rows)},
        "runs": rows,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
