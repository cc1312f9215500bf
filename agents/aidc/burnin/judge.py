"""Judge each node against the fleet and against the spec's floors, with reasons.

The rule (fleet-relative): a node fails a metric when its value is more than
`fleet_tolerance` below the fleet median of that metric. The median is robust: one or
two slow nodes do not drag the reference down with them.

The MAD-based robust z-score, 0.6745 (x - median) / MAD, is computed and reported for
every figure as evidence but is deliberately NOT a failure rule on its own: in a fleet of
identical hardware the MAD is tiny, so a z-score rule fails healthy nodes for a few
percent of noise (the "spurious performance-check failures" users complain about), while
a relative tolerance states the operator's intent directly ("more than 25% slow is bad").

Floors (`spec.floors(gpu_model)`) catch a fleet that is uniformly broken, which no
fleet-relative rule can. Training failures (loss did not fall, parameters differ across
ranks, wrong all_reduce result) and measurement errors fail the nodes concerned.
Every failure has a reason; every check not made has a note.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

from aidc.burnin.report import UNITS, NodeResult
from aidc.burnin.storage import STORAGE_METRICS

# Metrics compared across the fleet: measured per node, one node at a time. The
# all_reduce busbw is one fleet-wide figure (a collective is as slow as its slowest
# rank), so it is checked against floors only.
FLEET_METRICS = ("gemm_fp32_tflops", "gemm_bf16_tflops", "memcpy_gbps") + STORAGE_METRICS


def mad(values: list[float]) -> float:
    med = statistics.median(values)
    return statistics.median(abs(v - med) for v in values)


def robust_z(value: float, median: float, mad_value: float) -> float:
    if mad_value == 0:
        return 0.0 if value == median else math.copysign(math.inf, value - median)
    return 0.6745 * (value - median) / mad_value


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def fleet_stats(nodes: dict[str, NodeResult]) -> dict[str, dict]:
    stats = {}
    for metric in FLEET_METRICS:
        values = [n.metrics[metric] for n in nodes.values() if metric in n.metrics]
        if values:
            stats[metric] = {"median": statistics.median(values), "mad": mad(values), "nodes": len(values)}
    return stats


def judge(nodes: dict[str, NodeResult], floors: dict[str, dict[str, float]], tolerance: float,
          min_loss_drop: float, metric_tolerance: dict[str, float] | None = None) -> dict:
    """Set `passed`, `reasons`, `notes` and `robust_z` on every node; return the fleet stats.

    `floors` maps node name -> {metric: floor}; `metric_tolerance` overrides `tolerance` per
    metric (storage has its own).
    """
    stats = fleet_stats(nodes)
    for n in nodes.values():
        n.reasons, n.notes, n.robust_z = [], [], {}
        n.reasons += [f"measurement failed: {e}" for e in n.errors]
        for metric in FLEET_METRICS:
            unit = UNITS[metric]
            tol = (metric_tolerance or {}).get(metric, tolerance)
            if metric not in n.metrics:
                if metric in STORAGE_METRICS:  # measured only where the run names a checkpoint path
                    n.notes.append(f"{metric}: not measured (no checkpoint path in this run)")
                elif not n.errors:
                    n.reasons.append(f"{metric} was not measured")
                continue
            value, s = n.metrics[metric], stats[metric]
            z = robust_z(value, s["median"], s["mad"])
            n.robust_z[metric] = round(z, 2) if math.isfinite(z) else None  # JSON has no infinity
            if s["nodes"] < 2:
                n.notes.append(f"{metric}: fleet comparison skipped (only {s['nodes']} node measured)")
            elif value < s["median"] * (1 - tol):
                below = 1 - value / s["median"] if s["median"] > 0 else 1.0
                n.reasons.append(f"{metric} {_fmt(value)} {unit} is {below:.0%} below the fleet median"
                                 f" {_fmt(s['median'])} {unit} (tolerance {tol:.0%})")
        for metric, floor in sorted(floors.get(n.node, {}).items()):
            unit = UNITS.get(metric, "")
            if metric not in n.metrics:
                n.notes.append(f"floor {metric}: not measured by this burn-in")
            elif n.metrics[metric] < floor:
                n.reasons.append(f"{metric} {_fmt(n.metrics[metric])} {unit} is below the {n.gpu_model}"
                                 f" floor {_fmt(floor)} {unit}")
        if not n.allreduce_correct:
            n.reasons.append("all_reduce returned a wrong sum on this node")
        t = n.training
        if not t:
            n.reasons.append("the DDP training run did not report")
        elif not t["loss_after"] < t["loss_before"] * (1 - min_loss_drop):
            n.reasons.append(f"training loss did not fall enough: {_fmt(t['loss_before'])} ->"
                             f" {_fmt(t['loss_after'])} (needs a {min_loss_drop:.0%} drop)")
    digests = {name: n.training["param_digest"] for name, n in nodes.items() if n.training}
    for name, reason in compare_digests(digests).items():
        nodes[name].reasons.append(reason)
    for n in nodes.values():
        n.passed = not n.reasons
    return stats


def compare_digests(digests: dict[str, str]) -> dict[str, str]:
    """Reasons, by node, for nodes whose parameters differ from the majority.

    With no strict majority there is no trustworthy reference, so every node fails.
    """
    if not digests:
        return {}
    counts = Counter(digests.values())
    reference, votes = counts.most_common(1)[0]
    if votes * 2 <= len(digests):
        return {node: f"parameters after DDP training differ across ranks with no majority"
                      f" ({len(counts)} distinct digests among {len(digests)} ranks): silent data corruption"
                for node in digests}
    return {node: f"parameters after DDP training differ from the {votes} of {len(digests)} ranks that agree"
                  f" (digest {d[:12]} vs {reference[:12]}): silent data corruption"
            for node, d in digests.items() if d != reference}
