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
fleet-relative rule can; for the collectives the floor is a policy fraction of the link rate
(`min_busbw_fraction`), judged on each node's busbw over the sweep's largest sizes. Training
failures (a DDP, FSDP or pipeline run whose loss did not fall, whose parameters differ
across ranks or, for FSDP and pipeline, from DDP's), wrong collective results and
measurement errors fail the nodes concerned. Every failure has a reason; every check not
made has a note.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

from aidc.burnin.collectives import metric_name
from aidc.burnin.report import UNITS, NodeResult
from aidc.burnin.storage import STORAGE_METRICS
from aidc.burnin.suite import ALL as ALL_TESTS, collectives_of

# Metrics compared across the fleet: measured per node, one node at a time (checkpoint storage
# too, with its own tolerance). Each collective's busbw (`<op>_busbw_gbps`:
# collectives.node_busbw on each node's own clock) too; a collective runs in step across the
# fleet, so that comparison sees a node that is slow to finish its part, while a slow link slows
# every rank alike (finding it needs pair tests). Who waits for whom inside a collective varies
# from run to run with the scheduling of every rank, so these figures get their own tolerance
# (`busbw_fleet_tolerance`).
FLEET_METRICS = ("gemm_fp32_tflops", "gemm_bf16_tflops", "memcpy_gbps") + STORAGE_METRICS
# The burn-in test that measures each per-node metric (aidc.burnin.suite; storage: every STORAGE_METRICS).
METRIC_TEST = {"gemm_fp32_tflops": "gemm", "gemm_bf16_tflops": "gemm", "memcpy_gbps": "memcpy"}

# FSDP and pipeline runs compute DDP's averaged gradient in another order: their parameters
# may differ from DDP's by float rounding only (measured ~1e-7 after 20 steps of the burn-in model).
PARALLEL_MATCH_TOLERANCE = 1e-4
TRAINING_NAMES = {"ddp": "DDP", "fsdp": "FSDP", "pipeline": "pipeline"}


def asked_for(metric: str, tests) -> bool:
    """Whether the burn-in tests `tests` measure `metric`."""
    if metric in STORAGE_METRICS:
        return "storage" in tests
    if metric in METRIC_TEST:
        return METRIC_TEST[metric] in tests
    return metric in {metric_name(op) for op in collectives_of(tests)}


def mad(values: list[float]) -> float:
    med = statistics.median(values)
    return statistics.median(abs(v - med) for v in values)


def robust_z(value: float, median: float, mad_value: float) -> float:
    if mad_value == 0:
        return 0.0 if value == median else math.copysign(math.inf, value - median)
    return 0.6745 * (value - median) / mad_value


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def fleet_metrics(nodes: dict[str, NodeResult]) -> tuple[str, ...]:
    """FLEET_METRICS and every collective busbw metric some node measured."""
    collective = sorted({m for n in nodes.values() for m in n.metrics if m.endswith("_busbw_gbps")})
    return FLEET_METRICS + tuple(collective)


def fleet_stats(nodes: dict[str, NodeResult]) -> dict[str, dict]:
    stats = {}
    for metric in fleet_metrics(nodes):
        values = [n.metrics[metric] for n in nodes.values() if metric in n.metrics]
        if values:
            stats[metric] = {"median": statistics.median(values), "mad": mad(values), "nodes": len(values)}
    return stats


def judge(nodes: dict[str, NodeResult], floors: dict[str, dict[str, float]], tolerance: float,
          min_loss_drop: float, *, link_rate_gbps: float | None = None, min_busbw_fraction: float = 0.0,
          busbw_tolerance: float | None = None, metric_tolerance: dict[str, float] | None = None,
          bad_link_on: frozenset[str] | set[str] = frozenset(),
          known_answers: dict[str, dict[str, str]] | None = None, soak_max_clock_sag: float = 0.1,
          baselines: dict[str, dict[str, float]] | None = None) -> dict:
    """Set `passed`, `reasons`, `notes` and `robust_z` on every node; return the fleet stats.

    `floors` maps node name -> {metric: floor}. `link_rate_gbps` (GB/s) with
    `min_busbw_fraction`: the policy floor for every collective's busbw. `busbw_tolerance`:
    the fleet tolerance for the collectives' busbw (default: `tolerance`); `metric_tolerance`
    overrides `tolerance` per metric (storage has its own). `bad_link_on`: nodes whose bad link
    burn-in localised; a collective's busbw is a fleet figure that one bad link drags down for
    every rank alike, so its floor miss is then a note everywhere (the culprit fails with the
    localised reason, added by the caller). `known_answers`: the stored {key: {check: sha256}}
    each GPU's seeded results are held to (aidc.burnin.known_answer); without one for a key,
    the run's GPUs of the same model vote. Wrong answers and failed DCGM tests name their GPUs
    in `failed_gpus`, as does an SM clock that sagged more than `soak_max_clock_sag` in a soak.
    `baselines` ({gpu model: {metric: value}}, aidc.burnin.baseline): each node is also held to its
    model's stored figures with the metric's tolerance, fleet or not: a node burned in alone is
    judged, and a uniformly slow fleet cannot outvote them. A collective run by one rank moves
    nothing over the fabric, so the link-rate floor does not apply to it (a note says so).
    """
    from aidc.burnin.dcgm import verdict as dcgm_verdict
    from aidc.burnin.soak import judge_soak
    from aidc.burnin.answers import judge_known_answers

    stats = fleet_stats(nodes)

    def tolerance_of(metric: str) -> float:
        if busbw_tolerance is not None and metric.endswith("_busbw_gbps"):
            return busbw_tolerance
        return (metric_tolerance or {}).get(metric, tolerance)

    for n in nodes.values():
        n.reasons, n.notes, n.robust_z, n.failed_gpus = [], [], {}, []
        n.reasons += [f"measurement failed: {e}" for e in n.errors]
        skipped = [t for t in ALL_TESTS if t not in n.tests]
        if skipped:
            n.notes.append(f"not run (not among the tests asked for): {', '.join(skipped)}")
        for metric in fleet_metrics(nodes):
            unit = UNITS[metric]
            if metric not in n.metrics:
                if not asked_for(metric, n.tests):
                    continue  # its test did not run: said once in the notes above
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
            elif value < s["median"] * (1 - (allowed := tolerance_of(metric))):
                below = 1 - value / s["median"] if s["median"] > 0 else 1.0
                n.reasons.append(f"{metric} {_fmt(value)} {unit} is {below:.0%} below the fleet median"
                                 f" {_fmt(s['median'])} {unit} (tolerance {allowed:.0%})")
            reference = (baselines or {}).get(n.gpu_model, {}).get(metric)
            if reference and value < reference * (1 - (allowed := tolerance_of(metric))):
                n.reasons.append(f"{metric} {_fmt(value)} {unit} is {1 - value / reference:.0%} below the"
                                 f" {n.gpu_model} baseline {_fmt(reference)} {unit} (tolerance {allowed:.0%})")
        for metric, floor in sorted(floors.get(n.node, {}).items()):
            unit = UNITS.get(metric, "")
            if metric not in n.metrics:
                n.notes.append(f"floor {metric}: not measured by this burn-in")
            elif n.metrics[metric] < floor:
                n.reasons.append(f"{metric} {_fmt(n.metrics[metric])} {unit} is below the {n.gpu_model}"
                                 f" floor {_fmt(floor)} {unit}")
        n.reasons += _collective_reasons(n, link_rate_gbps if len(nodes) > 1 else None, min_busbw_fraction,
                                         ", ".join(sorted(bad_link_on)))
        if len(nodes) == 1 and n.collectives and link_rate_gbps and min_busbw_fraction:
            n.notes.append("collectives ran on one rank: checked for correct results; the link-rate floor"
                           " does not apply (one rank moves nothing over the fabric)")
        if "train" in n.tests:
            n.reasons += _training_reasons(n, min_loss_drop)
        n.reasons += _unstable_gemm_reasons(n)
        for reasons, notes, failed in (dcgm_verdict(n.dcgm), judge_soak(
                {int(i): s for i, s in n.soak.get("series", {}).items()}, soak_max_clock_sag)):
            n.reasons += reasons
            n.notes += notes
            n.failed_gpus = sorted(set(n.failed_gpus) | set(failed))
    judge_known_answers({name: n for name, n in nodes.items() if "gemm" in n.tests}, known_answers or {})
    for mode, what in TRAINING_NAMES.items():
        digests = {name: n.run(mode)["param_digest"] for name, n in nodes.items() if n.run(mode)}
        for name, reason in compare_digests(digests, f"{what} training").items():
            nodes[name].reasons.append(reason)
    for n in nodes.values():
        n.passed = not n.reasons
    return stats


def _collective_reasons(n: NodeResult, link_rate_gbps: float | None, min_fraction: float,
                        bad_link_on: str = "") -> list[str]:
    reasons = []
    for op, rows in n.collectives.items():
        wrong = [r["bytes"] for r in rows if not r["correct"]]
        if wrong:
            reasons.append(f"{op} returned a wrong result on this node (at {', '.join(map(str, wrong))} B)")
        value = n.metrics.get(metric_name(op))
        if rows and value is not None and link_rate_gbps and value < min_fraction * link_rate_gbps:
            miss = (f"{op} busbw {_fmt(value)} GB/s (largest sizes, up to {rows[-1]['bytes']} B) is"
                    f" {value / link_rate_gbps:.1%} of the link rate {_fmt(link_rate_gbps)} GB/s"
                    f" (policy floor {min_fraction:.0%})")
            if bad_link_on:
                n.notes.append(f"{miss}: the fleet figure, explained by the bad link localised on {bad_link_on}")
            else:
                reasons.append(miss)
    return reasons


def _training_reasons(n: NodeResult, min_loss_drop: float) -> list[str]:
    reasons = []
    for mode, what in TRAINING_NAMES.items():
        t = n.run(mode)
        if not t:
            reasons.append(f"the {what} training run did not report")
            continue
        label = "training loss" if mode == "ddp" else f"{what} training loss"
        if not t["loss_after"] < t["loss_before"] * (1 - min_loss_drop):
            reasons.append(f"{label} did not fall enough: {_fmt(t['loss_before'])} ->"
                           f" {_fmt(t['loss_after'])} (needs a {min_loss_drop:.0%} drop)")
        diff = t.get("max_abs_diff_vs_ddp")
        if diff is not None and not diff <= PARALLEL_MATCH_TOLERANCE:
            reasons.append(f"parameters after {what} training differ from the DDP run's by up to {_fmt(diff)}"
                           f" (rounding allows {PARALLEL_MATCH_TOLERANCE:g})")
    return reasons


def _unstable_gemm_reasons(n: NodeResult) -> list[str]:
    reasons = []
    for g in n.gpus:
        for dtype in ("fp32", "bf16"):
            if not g.get(f"gemm_{dtype}", {}).get("results_stable", True):
                reasons.append(f"GPU {g['index']}: the {dtype} GEMM's product changed between warm-up and the last"
                               " timed sample (same operands): silent data corruption under load")
                n.failed_gpus.append(g["index"])
    return reasons


def compare_digests(digests: dict[str, str], what: str = "DDP training") -> dict[str, str]:
    """Reasons, by node, for nodes whose parameters differ from the majority.

    With no strict majority there is no trustworthy reference, so every node fails.
    """
    if not digests:
        return {}
    counts = Counter(digests.values())
    reference, votes = counts.most_common(1)[0]
    if votes * 2 <= len(digests):
        return {node: f"parameters after {what} differ across ranks with no majority"
                      f" ({len(counts)} distinct digests among {len(digests)} ranks): silent data corruption"
                for node in digests}
    return {node: f"parameters after {what} differ from the {votes} of {len(digests)} ranks that agree"
                  f" (digest {d[:12]} vs {reference[:12]}): silent data corruption"
            for node, d in digests.items() if d != reference}
