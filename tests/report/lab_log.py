"""A lab-like audit log, written by the real stages the lab runs (the burn-in judge and its
certificates, a health agent reading a simulated node's kernel log, the failover controller
quarantining through the lab scheduler), without starting the lab's processes: the burn-in
measurements are fixed figures of a healthy 2-core run with one node 40% slow on memory copy,
so the report has a failing node to show."""

from __future__ import annotations

from pathlib import Path

from aidc.audit.log import AuditLog
from aidc.burnin.runner import _certify, _judged_report
from aidc.device import sim
from aidc.device.sim import SimBackend
from aidc.failover.controller import FailoverController
from aidc.failover.scheduler import LabScheduler
from aidc.health.agent import HealthAgent
from aidc.milestones import ms_after
from aidc.spec import parse_spec
from aidc.store import Store

SPEC = {"name": "lab", "device_backend": "sim",
        "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1}],
        "fabric": {"link_speed_gbps": 25}, "policy": {"max_unavailable": 1}}
SIZES = [2 ** e for e in range(10, 23, 2)]


def _raw(index: int, slow_memcpy: bool) -> dict:
    """One node's burn-in measurements, shaped as aidc.burnin.worker writes them."""
    memcpy = 1.9 * (0.6 if slow_memcpy else 1.0 + 0.01 * index)

    def sweep(factor: float) -> list[dict]:
        rows = []
        for n in SIZES:
            us = 40 + n / 2000
            rows.append({"bytes": n, "iterations": 8, "time_us": us, "algbw_gbps": n / us / 1e3,
                         "busbw_gbps": factor * n / us / 1e3, "own_time_us": us * 0.98,
                         "own_busbw_gbps": factor * n / (us * 0.98) / 1e3, "correct": True})
        return rows

    return {"metrics": {"gemm_fp32_tflops": 0.041 + 0.001 * index, "gemm_bf16_tflops": 0.012 + 0.0004 * index,
                        "memcpy_gbps": memcpy},
            "errors": [], "gpus": [], "phase_s": {"gemm": 1.2, "all_reduce": 0.8},
            "training": {"loss_before": 2.3, "loss_after": 1.1, "steps": 20, "param_digest": "a1b2c3d4e5f6",
                         "step_time_ms": 10.8},
            "parallel": {mode: {"loss_before": 2.3, "loss_after": 1.1, "steps": 20, "param_digest": "b2c3d4e5f6a1",
                                "max_abs_diff_vs_ddp": 8e-8, "step_time_ms": ms}
                         for mode, ms in (("fsdp", 28.8), ("pipeline", 16.1))},
            "collectives": {"all_reduce": sweep(1.6), "all_gather": sweep(0.8), "reduce_scatter": sweep(0.8),
                            "broadcast": sweep(1.0), "all_to_all": sweep(0.8)}}


def build_lab_audit_log(base: Path, *, with_collectives: bool = True, completed: bool = True) -> Path:
    spec = parse_spec(SPEC)
    nodes = spec.nodes()
    lab_dir = base / "lab"
    node_dirs = {n.name: sim.create_node(lab_dir / "nodes" / n.name, n.name, gpus=2, node_index=i)
                 for i, n in enumerate(nodes)}
    db = base / "audit.db"
    audit, store = AuditLog(db), Store(base / "state.db")
    try:
        audit.append("lab.start", "lab from stack lab", actor="lab", payload={
            "nodes": [n.name for n in nodes], "lab_dir": str(lab_dir), "stack": "lab"})
        raw = {n.name: _raw(i, slow_memcpy=n.name == "gpu-2") for i, n in enumerate(nodes)}
        report = _judged_report(spec, nodes, raw, 14.2, spec.fabric.link_speed_gbps / 8)
        _certify(audit, report)
        if with_collectives:
            # The collectives branch's certificate shape: a sweep per collective with link fractions.
            link_gbps = 100.0
            rows = {name: [{"bytes": n, "algbw_gbps": f * n / (40 + n / 2000) / 1e3,
                            "busbw_gbps": 1.6 * f * n / (40 + n / 2000) / 1e3,
                            "link_fraction": 1.6 * f * n / (40 + n / 2000) / 1e3 / (link_gbps / 8)} for n in SIZES]
                    for name, f in (("all_reduce", 1.0), ("all_gather", 1.2), ("reduce_scatter", 1.1))}
            audit.append("burnin.certificate", "passed burn-in", actor="burnin", node="gpu-spare-0", payload={
                **audit.records(kind="burnin.certificate", node="gpu-spare-0")[-1].payload,
                "collectives": rows, "link_rate_gbps": link_gbps / 8})

        victim = "gpu-1"
        injected = sim.inject(node_dirs[victim], "xid", 0, xid=79)
        audit.append("lab.inject", f"injected XID 79 on {victim} gpu 0", actor="lab", node=victim, payload=injected)
        agent = HealthAgent(victim, SimBackend(node_dirs[victim]), node_dirs[victim] / "kern.log", store, audit)
        try:
            agent.step()
        finally:
            agent.close()
        FailoverController(spec, store, audit, LabScheduler(lab_dir), dry_run=False).run_once()
        # An operator's dry run: what it would do goes into the dry-run table, not the incident.
        FailoverController(spec, store, audit, LabScheduler(lab_dir), dry_run=True).release(
            "gpu-3", "checking the release path", actor="ops")
        resume_s = 2.84
        audit.append("lab.resume", "training resumed on gpu-0, gpu-2, gpu-3, gpu-spare-0", actor="lab", payload={
            "resume_s": resume_s, "resumed_from_step": 41, "steps_lost": 1,
            "world": ["gpu-0", "gpu-2", "gpu-3", "gpu-spare-0"], "victim": victim})
        # As the lab measures them (aidc.lab.run.LabRun.inject_and_measure): from the same records.
        decision = audit.records(kind="failover.decision", node=victim)[-1]
        action = next(r for r in audit.records(kind="failover.action", node=victim) if r.ts > injected["written_at"])
        audit.append("lab.summary", "lab loop " + ("completed" if completed else "did not complete"), actor="lab",
                     payload={"certified_nodes": report.certified_nodes, "failed_nodes": report.failed_nodes,
                              "victim": victim, "xid": 79,
                              "detect_ms": ms_after(injected["written_at"], decision.ts),
                              "quarantine_ms": ms_after(injected["written_at"], action.ts),
                              "resume_s": resume_s, "steps_lost": 1, "ettr": 0.912, "train_steps": 60,
                              "completed": completed, "wall_s": 71.3, "scheduler": "lab",
                              "error": None if completed else "training did not finish: gpu-3 stopped answering"})
    finally:
        store.close()
        audit.close()
    return db


GOODPUT_PARTS = {"productive": 61.2, "checkpoint": 0.4, "detection": 0.1, "restart": 4.1, "lost": 1.3, "idle": 0.9}


def append_goodput_report(log: AuditLog) -> None:
    """The lab's `goodput.report`: the job's wall time by part and the advised checkpoint interval."""
    wall = sum(GOODPUT_PARTS.values())
    log.append("goodput.report", "job llm: ETTR 0.87", actor="goodput", payload={
        "goodput": {"job": "llm", "ettr": 0.87, "wall_s": wall, "seconds": GOODPUT_PARTS,
                    "fractions": {k: v / wall for k, v in GOODPUT_PARTS.items()}},
        "checkpoint_advice": {"advised_interval_s": 12.5, "young_interval_s": 13.1, "current_interval_s": 0.05,
                              "expected_ettr_advised": 0.97, "expected_ettr_current": 0.9, "save_cost_s": 0.002,
                              "mtbf": {"seconds": 600, "source": "audit"}}})


def compress_results() -> dict:
    """A compression benchmark result of the shape aidc.compress.runner returns (figures from a
    quick run on this machine), with techniques close together in size so labels would crowd."""
    def row(label, params, mb, lat, acc, front_l, front_s):
        return {"label": label, "params": params, "disk_bytes": int(mb * 1e6), "linear_ratio": None,
                "size_ratio": 0.27 / mb, "latency_b1_ms": lat / 8, "batch_ms_normalised": lat,
                "speedup_tp": 1.9 / lat, "quality_value": acc, "quality_delta": acc - 97.2,
                "pareto_latency": front_l, "pareto_size": front_s, "throughput_batch": 256}
    rows = [row("fp32 baseline", 67_850, 0.27, 1.9, 97.2, False, False),
            row("dynamic int8", 67_850, 0.08, 1.4, 97.0, True, True),
            row("structured pruning 50%", 34_000, 0.14, 1.1, 96.1, True, False),
            row("unstructured pruning 50%", 67_850, 0.27, 1.9, 97.1, False, False),
            row("distilled student", 17_000, 0.07, 0.6, 95.4, True, True)]
    return {"torch": "2.13.0+cpu", "threads": 2, "cpu_capability": "AVX2", "quick": True,
            "started": "2026-11-30T02:00:00Z", "duration_s": 12.0,
            "models": [{"model": "digits-mlp", "rows": rows, "skipped": [], "quality_key": "accuracy_pct",
                        "quality_unit": "pt", "recommendation": "dynamic int8: 3.4x smaller, -0.2 pt"}],
            "targets": [{"id": "digits-distill", "met": True, "measured": {"param_ratio": 0.25}}]}
