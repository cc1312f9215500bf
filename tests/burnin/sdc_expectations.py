"""What every launcher's burn-in must show after `inject(gpu-1's node dir, "sdc", gpu=1)` on a
run of gpu-0, gpu-1 and gpu-2 (tests/slurm and tests/kube run it end to end)."""

from __future__ import annotations

from aidc.audit.log import AuditLog

# Timing is not under test here: without floors a loaded machine cannot fail a node on speed
# (the fleet-relative checks stay on).
NO_TIMING_FLOORS = {"gemm_bf16_tflops": 0.0, "gemm_fp32_tflops": 0.0, "memcpy_gbps": 0.0}


def assert_only_gpu_1_of_node_gpu_1_failed(out: dict, lab) -> None:
    """`out`: the run's `--json`; `lab`: its lab directory, holding the audit log."""
    assert [(n["node"], n["verdict"], n["failed_gpus"]) for n in out["nodes"]] == [
        ("gpu-0", "pass", []), ("gpu-1", "fail", [1]), ("gpu-2", "pass", [])]
    reasons = next(n["reasons"] for n in out["nodes"] if n["node"] == "gpu-1")
    assert reasons and all("GPU 1" in r for r in reasons), "\n".join(reasons)
    assert any("silent data corruption" in r for r in reasons), reasons  # the known-answer mismatch
    with AuditLog(lab / "audit.db") as audit:
        certs = {r.node: r.payload for r in audit.records(kind="burnin.certificate")}
    assert {node: c["failed_gpus"] for node, c in certs.items()} == {"gpu-0": [], "gpu-1": [1], "gpu-2": []}
