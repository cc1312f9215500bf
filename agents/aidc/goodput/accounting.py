"""Where a job's wall time went, from its step log, and its ETTR.

ETTR (effective training time ratio) as Meta's RSC reliability study defines it
(Kokolis et al., "Revisiting Reliability in Large-Scale Machine Learning Research Clusters",
HPCA 2025, arXiv:2410.21680): productive runtime / available wall-clock time of the job.
Here the wall clock is the job's allocation: from its `allocation` record (else its first
record) to its `end` record (else its last record, or the `until` given).

Every instant of that wall time gets exactly one label, so the six parts add up to it:

    checkpoint  > productive | lost > detection > lost (partial step) > restart > idle

* productive: the last execution of each step number (the trajectory the job kept);
* lost: executions of a step that a later restart redid (it restored an older checkpoint),
  plus the step in progress when a fault struck (from its start to the fault);
* checkpoint: training stood still for a checkpoint (`checkpoint` record t0..t1);
* detection: from a fault to its detection (`fault` t..detected_t);
* restart: from a detected fault (or, when nobody told the log, from the previous run's
  last record) to the first step of the next run: teardown, rendezvous, process start,
  restore. The first start of the job (allocation to first step) counts here too;
* idle: anything else (between steps, after the last step until the end).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# Higher wins where intervals overlap.
PRIORITY = {"checkpoint": 6, "productive": 5, "lost": 5, "detection": 4, "lost_partial": 3, "restart": 2}
CATEGORIES = ("productive", "checkpoint", "detection", "restart", "lost", "idle")
ETTR_DEFINITION = ("ETTR = productive training time / wall time of the job's allocation "
                   "(Meta RSC study, arXiv:2410.21680)")


@dataclass
class Goodput:
    job: str | None
    wall_s: float
    seconds: dict[str, float]
    steps_kept: int
    steps_redone: int
    restarts: int
    faults: int
    step_s_median: float | None
    checkpoints: int
    checkpoint_stall_s_median: float | None
    checkpoint_write_s_median: float | None
    checkpoint_interval_s_median: float | None
    checkpoint_mode: str | None
    resume_s: list[float] = field(default_factory=list)
    world_size: int | None = None

    @property
    def ettr(self) -> float:
        return self.seconds["productive"] / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "job": self.job, "ettr": round(self.ettr, 4), "definition": ETTR_DEFINITION,
            "wall_s": round(self.wall_s, 3), "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "fractions": {k: round(v / self.wall_s, 4) if self.wall_s > 0 else 0.0 for k, v in self.seconds.items()},
            "steps_kept": self.steps_kept, "steps_redone": self.steps_redone, "restarts": self.restarts,
            "faults": self.faults, "resume_s": [round(r, 3) for r in self.resume_s],
            "step_s_median": _r(self.step_s_median), "checkpoints": self.checkpoints,
            "checkpoint_mode": self.checkpoint_mode,
            "checkpoint_stall_s_median": _r(self.checkpoint_stall_s_median),
            "checkpoint_write_s_median": _r(self.checkpoint_write_s_median),
            "checkpoint_interval_s_median": _r(self.checkpoint_interval_s_median),
            "world_size": self.world_size,
        }


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def account(records: list[dict], since: float | None = None, until: float | None = None) -> Goodput:
    """Split the job's wall time (optionally only [since, until]) into the six parts."""
    records = sorted(records, key=lambda r: r["t"])
    alloc = next((r for r in records if r["kind"] == "allocation"), None)
    end = next((r for r in reversed(records) if r["kind"] == "end"), None)
    t_begin = alloc["t"] if alloc else min(r.get("t0", r["t"]) for r in records)
    t_end = end["t"] if end else max(r["t"] for r in records)
    if since is not None:
        t_begin = max(t_begin, since)
    if until is not None:
        t_end = min(t_end, until)

    steps = [r for r in records if r["kind"] == "step"]
    starts = [r for r in records if r["kind"] == "start"]
    faults = [r for r in records if r["kind"] == "fault"]
    ckpts = [r for r in records if r["kind"] == "checkpoint"]

    intervals: list[tuple[float, float, str]] = []
    # The kept trajectory: the last execution of each step number.
    last_exec: dict[int, int] = {}
    for i, s in enumerate(steps):
        last_exec[s["step"]] = i
    kept = set(last_exec.values())
    for i, s in enumerate(steps):
        intervals.append((s["t0"], s["t1"], "productive" if i in kept else "lost"))
    for c in ckpts:
        intervals.append((c["t0"], c["t1"], "checkpoint"))

    # Each run: a start record and the first step after it.
    resume_s = []
    for k, st in enumerate(starts):
        first = next((s for s in steps if s["t0"] >= st["t"]), None)
        nxt = starts[k + 1]["t"] if k + 1 < len(starts) else float("inf")
        if first is None or first["t0"] >= nxt:
            first_t0 = min(nxt, t_end)
        else:
            first_t0 = first["t0"]
        if k == 0:
            intervals.append((t_begin, first_t0, "restart"))
            continue
        prev_start = starts[k - 1]["t"]
        fault = next((f for f in reversed(faults) if prev_start <= f["t"] <= st["t"]), None)
        if fault is not None:
            detected = fault.get("detected_t", fault["t"])
            intervals.append((fault["t"], detected, "detection"))
            before = [s["t1"] for s in steps if s["t1"] <= detected and s["t0"] >= prev_start]
            if before:
                intervals.append((max(before), fault["t"], "lost_partial"))
            intervals.append((detected, first_t0, "restart"))
            resume_s.append(first_t0 - fault["t"])
        else:
            prev_records = [r.get("t1", r["t"]) for r in records if prev_start <= r["t"] < st["t"]
                            and r["kind"] in ("step", "checkpoint", "start")]
            intervals.append((max(prev_records, default=prev_start), first_t0, "restart"))

    seconds = _sweep(intervals, t_begin, t_end)
    seconds["lost"] += seconds.pop("lost_partial")

    step_durations = [s["t1"] - s["t0"] for s in steps]
    durable = [r["write_s"] for r in records if r["kind"] == "checkpoint_durable"]
    ckpt_gaps = [b["t0"] - a["t0"] for a, b in zip(ckpts, ckpts[1:])
                 if not any(a["t"] < st["t"] < b["t0"] for st in starts)]
    modes = sorted({c["mode"] for c in ckpts})
    worlds = [len(st["world"]) for st in starts if st.get("world")]
    return Goodput(
        job=alloc["job"] if alloc else None, wall_s=max(0.0, t_end - t_begin), seconds=seconds,
        steps_kept=len(kept), steps_redone=len(steps) - len(kept), restarts=max(0, len(starts) - 1),
        faults=len(faults), step_s_median=_median(step_durations), checkpoints=len(ckpts),
        checkpoint_stall_s_median=_median([c["t1"] - c["t0"] for c in ckpts]),
        checkpoint_write_s_median=_median(durable), checkpoint_interval_s_median=_median(ckpt_gaps),
        checkpoint_mode="/".join(modes) or None, resume_s=resume_s, world_size=worlds[-1] if worlds else None,
    )


def _sweep(intervals: list[tuple[float, float, str]], t_begin: float, t_end: float) -> dict[str, float]:
    """Seconds per label over [t_begin, t_end]: each instant goes to the highest-priority
    interval covering it, instants no interval covers are idle."""
    seconds = {c: 0.0 for c in (*CATEGORIES, "lost_partial")}
    events: list[tuple[float, int, str]] = []
    for a, b, label in intervals:
        a, b = max(a, t_begin), min(b, t_end)
        if b > a:
            events += [(a, 1, label), (b, -1, label)]
    events.sort(key=lambda e: (e[0], e[1]))
    active = {label: 0 for label in PRIORITY}
    t_prev = t_begin
    for t, delta, label in events:
        if t > t_prev:
            covering = [lbl for lbl, n in active.items() if n > 0]
            seconds[max(covering, key=PRIORITY.__getitem__) if covering else "idle"] += t - t_prev
            t_prev = t
        active[label] += delta
    if t_end > t_prev:
        seconds["idle"] += t_end - t_prev
    return seconds
