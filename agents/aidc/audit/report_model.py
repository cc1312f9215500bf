"""What the audit report says, gathered from the records alone: the verdict, the failover
timeline of each incident (T+ms from the fault), burn-in per node against the fleet, the
collective sweeps, goodput, and the records sorted into incident, dry-run and benchmark
tables. Plain data: the templates in aidc/audit/templates only lay it out."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import math
import platform
import statistics
from dataclasses import dataclass, field

import aidc
from aidc.audit import charts
from aidc.audit.log import AuditRecord, VerifyResult
from aidc.milestones import MILESTONES, ms_after

# Units of the burn-in figures (aidc.burnin.report.UNITS, repeated here so that reading a
# report does not import the burn-in package and its torch-only neighbours).
BURNIN_UNITS = {"gemm_fp32_tflops": "TFLOP/s", "gemm_bf16_tflops": "TFLOP/s", "memcpy_gbps": "GB/s",
                "allreduce_busbw_gbps": "GB/s"}
BURNIN_TITLES = {"gemm_fp32_tflops": "GEMM fp32", "gemm_bf16_tflops": "GEMM bf16", "memcpy_gbps": "memory copy",
                 "allreduce_busbw_gbps": "all_reduce bus bandwidth"}
# Records of measurements, not of an incident: kept out of the incident timeline.
BENCHMARK_KINDS = ("compress.result", "burnin.certificate", "burnin.aborted", "bench.")
ETTR_DEFINITION = ("ETTR (effective training time ratio) = productive training time / wall time of the job's "
                   "allocation (Meta's Research SuperCluster study, arXiv:2410.21680): time lost to failures, "
                   "restarts, recomputed steps, checkpoint stalls and waiting is what it does not count.")


def when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _finite(value) -> bool:
    """A figure that can be drawn (a failed measurement may be recorded as NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def is_dry_run(rec: AuditRecord) -> bool:
    return rec.dry_run  # one definition, shared with `aidc audit show`


def is_benchmark(rec: AuditRecord) -> bool:
    return rec.kind.startswith(BENCHMARK_KINDS)


@dataclass
class Verdict:
    ok: bool | None  # None: the log holds no lab loop to judge
    headline: str
    details: list[str] = field(default_factory=list)


def verdict(records: list[AuditRecord], verified: VerifyResult, faults: list[dict] | None = None) -> Verdict:
    """Did the loop complete, and if not, what failed (the first failures, in order)? A log
    without a lab loop (production) is judged on its faults: was every faulty node quarantined?
    `faults` are the incidents() of the records."""
    summary = next((r for r in reversed(records) if r.kind == "lab.summary"), None)
    failures = [f"{r.kind} on {r.node}: {r.reason}" if r.node else f"{r.kind}: {r.reason}" for r in records
                if r.kind in ("failover.error", "burnin.aborted", "lab.error")
                or (r.kind == "burnin.certificate" and r.payload.get("verdict") != "pass")]
    details = []
    if not verified.ok:
        details.append(f"the audit log does not verify{verified.failure}")
    if summary is None:
        if not verified.ok:
            return Verdict(False, "Audit log verification FAILED", details + failures[:5])
        faults = incidents(records) if faults is None else faults
        if faults:
            missed = [f["node"] for f in faults if next(s for s in f["steps"] if s["key"] == "quarantine")["ms"] is None]
            errors = [f for f in failures if f.startswith("failover.error")]
            head = (f"{len(faults)} fault(s) on {', '.join(sorted({f['node'] for f in faults}))}: "
                    + (f"NOT quarantined: {', '.join(missed)}" if missed else "every faulty node quarantined"))
            return Verdict(not missed and not errors, head, errors[:5])
        return Verdict(None if not failures else False, "No lab loop and no fault in this log", failures[:5])
    p = summary.payload
    if p.get("completed") and verified.ok:
        bits = [f"{len(p.get('certified_nodes') or [])} nodes certified"]
        if p.get("victim"):
            fault = (f"XID {p['xid']} on {p['victim']}" if p.get("xid") is not None else f"fault on {p['victim']}")
            steps = [f"{what} {charts.fmt(p[key])} ms" for key, what in
                     (("detect_ms", "quarantine decided"), ("quarantine_ms", "quarantined")) if _finite(p.get(key))]
            bits.append(fault + (f", {' and '.join(steps)} after the fault" if steps else ""))
        if p.get("resume_s") is not None:
            bits.append(f"training resumed after {p['resume_s']:g} s, {p.get('steps_lost', 0)} step(s) lost")
        return Verdict(True, "Loop completed: " + "; ".join(bits), details)
    if p.get("error"):
        details.insert(0, p["error"])
    if p.get("failed_nodes"):
        details.append(f"burn-in failed on {', '.join(p['failed_nodes'])}")
    head = "Loop completed, but the audit log does not verify" if p.get("completed") else "Loop did NOT complete"
    return Verdict(False, head, details + failures[:5])




def incidents(records: list[AuditRecord]) -> list[dict]:
    """One failover incident per injected fault (lab) or per fault the agent raised without an
    injection: the milestones as milliseconds after the fault, and the chart that shows them."""
    out = []
    injected = [r for r in records if r.kind == "lab.inject"]
    starts = [(r, r.payload.get("written_at", r.ts)) for r in injected]
    if not starts:  # production: the agent's own record is the earliest sign of a fault
        seen = set()
        for r in records:
            if r.kind == "health.fault" and r.node not in seen and not is_dry_run(r):
                seen.add(r.node)
                starts.append((r, r.ts))
    for i, (start, t0) in enumerate(starts):
        node = start.node
        # Faults on different nodes interleave (the second can come before the first is
        # handled): each incident runs until the next fault on the same node.
        t_end = next((t for r, t in starts[i + 1:] if r.node == node), float("inf"))

        def first(pred):
            return next((r for r in records if t0 <= r.ts < t_end and pred(r)), None)

        found = {
            "fault": start if start.kind == "lab.inject" else None,
            "detect": first(lambda r: r.kind == "health.fault" and r.node == node),
            "decide": first(lambda r: r.kind == "failover.decision" and r.node == node
                            and r.payload.get("verdict") in ("quarantine", "quarantine_gpu")),
            "quarantine": first(lambda r: r.kind == "failover.action" and r.node == node),
            "resume": first(lambda r: r.kind == "lab.resume" and r.payload.get("victim", node) == node),
        }
        steps = [{"key": "fault", "label": MILESTONES[0][1], "ms": 0.0, "record": start}]
        for key, label in MILESTONES[1:]:
            rec = found[key]
            if rec is None:
                steps.append({"key": key, "label": label, "ms": None, "record": None})
                continue
            ms = ms_after(t0, rec.ts)
            if key == "resume" and rec.payload.get("resume_s") is not None:
                ms = round(rec.payload["resume_s"] * 1000, 1)  # milestones.DEFINITIONS["resume_s"]
            steps.append({"key": key, "label": label, "ms": ms, "record": rec})
        reached = [s for s in steps[1:] if s["ms"] is not None]
        chart = charts.bar_rows([{"label": s["key"], "value": s["ms"]} for s in reached],
                                "milliseconds after the fault (T+ms)", "ms") if reached else None
        out.append({"node": node, "at": when(t0), "what": start.reason,
                    "steps": steps, "chart": chart, "missing": [s["label"] for s in steps if s["ms"] is None]})
    return out


def burnin(records: list[AuditRecord]) -> dict | None:
    """The newest certificate per node: a chart and a table per fleet metric, against the
    fleet median, the tolerance below it, and the GPU model's floor."""
    latest: dict[str, AuditRecord] = {}
    for r in records:
        if r.kind == "burnin.certificate" and r.node:
            latest[r.node] = r
    if not latest:
        return None
    certs = list(latest.values())
    fleet = certs[-1].payload.get("fleet") or {}
    tolerance = fleet.get("fleet_tolerance")
    metrics = []
    names = [m for m in BURNIN_UNITS if any(m in (c.payload.get("metrics") or {}) for c in certs)]
    for metric in names:
        unit = BURNIN_UNITS[metric]
        values = {c.node: c.payload["metrics"][metric] for c in certs
                  if _finite((c.payload.get("metrics") or {}).get(metric))}
        if not values:
            continue
        stats = (fleet.get("stats") or {}).get(metric) or {}
        median = stats.get("median", statistics.median(values.values()) if metric != "allreduce_busbw_gbps" else None)
        threshold = median * (1 - tolerance) if median is not None and tolerance is not None else None
        floors = {(c.payload.get("floors") or {}).get(metric) for c in certs} - {None}
        floor = min(floors) if floors else None
        rows = []
        for node, value in values.items():
            below_median = (1 - value / median) if median else None
            bad = (threshold is not None and value < threshold) or (floor is not None and value < floor)
            rows.append({"node": node, "value": value, "bad": bad, "z": (latest[node].payload.get("robust_z") or {}).get(metric),
                         "vs_median": f"{-below_median:+.1%}" if below_median is not None else "-"})
        lines = [{"label": "fleet median", "value": median, "style": "median"},
                 {"label": f"tolerance ({tolerance:.0%} below median)" if tolerance is not None else "tolerance",
                  "value": threshold, "style": "threshold"},
                 {"label": "floor", "value": floor, "style": "floor"}]
        chart = charts.bar_rows([{"label": r["node"], "value": r["value"], "bad": r["bad"]} for r in rows],
                                f"{BURNIN_TITLES[metric]} ({unit})", unit, lines)
        metrics.append({"name": metric, "title": BURNIN_TITLES[metric], "unit": unit, "median": median,
                        "threshold": threshold, "floor": floor, "rows": rows, "chart": chart,
                        "legend": [ln for ln in lines if ln["value"] is not None]})
    nodes = [{"node": c.node, "passed": c.payload.get("verdict") == "pass", "spare": c.payload.get("spare"),
              "at": when(c.ts), "reasons": c.payload.get("reasons") or [], "notes": c.payload.get("notes") or []}
             for c in certs]
    # A note every node has (a figure this run could not measure) is said once, not per node.
    shared = [n for n in nodes[0]["notes"] if all(n in other["notes"] for other in nodes)] if len(nodes) > 1 else []
    for n in nodes:
        n["notes"] = [x for x in n["notes"] if x not in shared]
    return {"tolerance": tolerance, "rule": fleet.get("rule"), "metrics": metrics, "nodes": nodes,
            "shared_notes": shared}


def collectives(records: list[AuditRecord]) -> list[dict]:
    """Collective sweeps from the newest certificate that has them: the rows of each collective
    (`collectives[<name>]`: bytes, algbw_gbps, busbw_gbps, link_fraction), else the fleet's
    all_reduce sweep; a chart of bus bandwidth against message size with the link rate."""
    cert = next((r for r in reversed(records) if r.kind == "burnin.certificate"
                 and (r.payload.get("collectives") or (r.payload.get("fleet") or {}).get("allreduce"))), None)
    if cert is None:
        return []
    p, fleet = cert.payload, cert.payload.get("fleet") or {}
    sweeps = {name: [{"bytes": row.get("bytes"), "algbw_gbps": row.get("algbw_gbps"),
                      "busbw_gbps": row.get("busbw_gbps"), "link_fraction": row.get("link_fraction")} for row in rows]
              for name, rows in (p.get("collectives") or {}).items()}
    if not sweeps:  # a certificate from before the five collectives: the fleet's all_reduce sweep
        sweeps = {"all_reduce": [{"bytes": row.get("nbytes"), "algbw_gbps": row.get("algbw_gbps"),
                                  "busbw_gbps": row.get("busbw_gbps"), "link_fraction": None}
                                 for row in fleet.get("allreduce") or []]}
    # The certificate's link_rate_gbps is in GB/s (as busbw); link_rate_gbit_s in bits.
    link_gbit = p["link_rate_gbps"] * 8 if _finite(p.get("link_rate_gbps")) else fleet.get("link_rate_gbit_s")
    series = [{"name": name, "points": [(r["bytes"], r["busbw_gbps"]) for r in rows
                                        if _finite(r["bytes"]) and _finite(r["busbw_gbps"])]}
              for name, rows in sweeps.items()]
    # The link rate is quoted in Gbit/s (as InfiniBand rates are); bus bandwidth in GB/s.
    ref = {"label": f"link rate {charts.fmt(link_gbit)} Gbit/s = {charts.fmt(link_gbit / 8)} GB/s", "value": link_gbit / 8} \
        if isinstance(link_gbit, (int, float)) and link_gbit > 0 else None
    chart = charts.line_chart(series, "message size", "bus bandwidth (GB/s)", ref)
    link_gbps = link_gbit / 8 if _finite(link_gbit) and link_gbit > 0 else None
    tables = []
    for name, rows in sweeps.items():
        for r in rows:
            r["size"] = charts.size_label(r["bytes"]) if _finite(r["bytes"]) else "-"
            if r["link_fraction"] is None and link_gbps and _finite(r["busbw_gbps"]):
                r["link_fraction"] = r["busbw_gbps"] / link_gbps
            r["implausible"] = _finite(r["link_fraction"]) and r["link_fraction"] > 1
        peak = max((r for r in rows if _finite(r["busbw_gbps"])), key=lambda r: r["busbw_gbps"], default=None)
        tables.append({"name": name, "rows": rows, "peak": peak,
                       "implausible": [r for r in rows if r["implausible"]]})
    return [{"node": cert.node, "at": when(cert.ts), "link_rate_gbit_s": link_gbit, "chart": chart,
             "sweeps": sweeps, "tables": tables,
             "implausible": sum(len(t["implausible"]) for t in tables)}]


def flags(records: list[AuditRecord]) -> list[dict]:
    """Figures the report does not take at face value: a bus bandwidth above the link rate is
    more than the link can carry (busbw is scaled to compare with it, nccl-tests' definition),
    so it is a measurement or configuration error, not a result."""
    out = []
    for c in collectives(records):
        for t in c["tables"]:
            out += [{"kind": "above_link_rate", "node": c["node"], "collective": t["name"], "bytes": r["bytes"],
                     "busbw_gbps": r["busbw_gbps"], "link_rate_gbit_s": c["link_rate_gbit_s"],
                     "link_fraction": round(r["link_fraction"], 4)} for r in t["implausible"]]
    return out


GOODPUT_PARTS = {  # aidc.goodput's parts of a job's wall time, and what each holds
    "productive": "steps of the trajectory the job kept",
    "checkpoint": "training stood still for a checkpoint",
    "detection": "from a fault to its detection",
    "restart": "start and restarts: teardown, rendezvous, process start, restore",
    "lost": "steps redone after a restore, and the step a fault cut short",
    "idle": "everything else",
}


def goodput(records: list[AuditRecord]) -> dict | None:
    """ETTR from the newest `goodput.report` (aidc.goodput's accounting of the job's step log:
    the wall time by part, the advised checkpoint interval), else the lab summary's figure."""
    summary = next((r.payload for r in reversed(records) if r.kind == "lab.summary"), {})
    report = next((r.payload for r in reversed(records) if r.kind == "goodput.report"), {})
    accounted = report.get("goodput") or {}
    ettr = accounted.get("ettr", summary.get("ettr"))
    if not _finite(ettr):
        return None
    seconds, fractions = accounted.get("seconds") or {}, accounted.get("fractions") or {}
    parts = [{"name": part, "seconds": charts.fmt(seconds.get(part, 0.0)),
              "share": f"{fractions.get(part, 0.0):.1%}", "meaning": meaning}
             for part, meaning in GOODPUT_PARTS.items()] if seconds else []
    advice = report.get("checkpoint_advice") or {}
    return {"ettr": ettr, "percent": f"{ettr:.1%}", "definition": ETTR_DEFINITION, "job": accounted.get("job"),
            "wall_s": accounted.get("wall_s"), "parts": parts,
            "advice": advice if "advised_interval_s" in advice else None, "advice_error": advice.get("error")}


def stack_info(records: list[AuditRecord]) -> dict:
    start = next((r for r in records if r.kind == "lab.start"), None)
    stack = (start.payload.get("stack") if start else None) or (
        start.reason.removeprefix("lab from stack ").strip() if start and start.reason.startswith("lab from stack") else "-")
    try:  # the version installed, read without importing torch
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = None
    return {"stack": stack, "aidc": aidc.__version__, "python": platform.python_version(), "torch": torch,
            "host": platform.node()}


ESCALATION_KINDS = ("failover.escalation", "failover.breaker.open", "failover.breaker.reset")


def failover_rows(records: list[AuditRecord]) -> list[dict]:
    """One row per escalation and per breaker opening or reset, oldest first."""
    rows = []
    for r in records:
        if r.kind not in ESCALATION_KINDS:
            continue
        p = r.payload
        if r.kind == "failover.escalation":
            what = f"{p.get('from_action')} -> {p.get('to_action')} ({p.get('rule')})"
        elif r.kind == "failover.breaker.open":
            what = f"breaker opened: {len(p.get('quarantines') or [])} quarantine(s), limit {p.get('limit')}"
        else:
            what = "breaker reset" + ("" if (p.get("was") or {}).get("open") else " (was not open)")
        rows.append({"seq": r.seq, "ts": r.ts, "when": when(r.ts), "kind": r.kind, "node": r.node or "-",
                     "actor": r.actor, "what": what, "reason": r.reason, "dry_run": r.dry_run})
    return rows


def record_row(r: AuditRecord) -> dict:
    return {"seq": r.seq, "when": when(r.ts), "kind": r.kind, "node": r.node or "-", "actor": r.actor,
            "reason": r.reason}


def build(records: list[AuditRecord], verified: VerifyResult, log_path: str, now: float) -> dict:
    """Everything the report template shows, from the records and their verification."""
    dry = [r for r in records if is_dry_run(r)]
    bench = [r for r in records if is_benchmark(r) and not is_dry_run(r)]
    incident = [r for r in records if not is_dry_run(r) and not is_benchmark(r)]
    summary = next((r.payload for r in reversed(records) if r.kind == "lab.summary"), None)
    faults = incidents(records)
    judged = verdict(records, verified, faults)
    flagged = flags(records)
    if flagged:  # said with the verdict: a figure no link can carry is not a result to read on
        judged.details.append(f"{len(flagged)} collective figure(s) above the link rate, implausible: "
                              + ", ".join(sorted({f["collective"] for f in flagged})) + " (see Collective sweep)")
    return {
        "verdict": judged, "verified": verified, "log_path": log_path,
        "generated_at": when(now), "about": stack_info(records), "summary": summary,
        "incidents": faults, "burnin": burnin(records), "collectives": collectives(records),
        "goodput": goodput(records), "escalations": failover_rows(records),
        "timeline": [record_row(r) for r in incident], "dry_run": [record_row(r) for r in dry],
        "benchmarks": [record_row(r) for r in bench],
    }
