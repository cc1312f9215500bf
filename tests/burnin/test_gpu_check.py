"""bench/gpu_check.sh on a machine without a GPU: a plain message, a non-zero exit, JSON saying why."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _driver_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(_driver_present(), reason="this machine has an NVIDIA driver: the no-driver path cannot be shown")
def test_without_a_driver_the_check_says_so_exits_non_zero_and_writes_why(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 3
    assert "no NVIDIA driver" in proc.stderr and "Traceback" not in proc.stderr
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["ok"] is False and "no NVIDIA driver" in doc["error"]


def test_gpu_names_map_to_catalog_models_for_their_floors():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import gpu_model_of
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert gpu_model_of("NVIDIA H200") == "H200"
    assert gpu_model_of("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_model_of("NVIDIA GeForce RTX 4090") is None


@pytest.mark.slow
def test_the_check_runs_through_on_a_simulated_node_and_writes_every_figure(tmp_path):
    from dataclasses import fields

    from aidc.device.base import GpuTelemetry
    from aidc.device.sim import create_node

    node = create_node(tmp_path / "node", "n0", gpus=1)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(ROOT / "agents")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--simulate", str(node), "--gemm-size", "64",
                           "--memcpy-bytes", "1048576", "--repeats", "2", "--allreduce-max", "65536",
                           "--train-steps", "10"], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["ok"] and doc["failures"] == []
    assert {f.name for f in fields(GpuTelemetry)} <= set(doc["nvml"]["gpus"][0])
    assert doc["nvml"]["xid_events"] == [] and doc["nvml"]["hung_calls"] == 0
    m = doc["measure"][0]
    assert m["gemm_bf16"]["tflops"] > 0 and m["gemm_fp32"]["tflops"] > 0 and m["memcpy"]["gbps"] > 0
    rows = doc["nccl"]["allreduce"]
    assert [r["bytes"] for r in rows][-1] == 65536 and all(r["busbw_gbps"] == 0 for r in rows)
    assert "busbw" in proc.stdout and "TFLOP/s" in proc.stdout
    assert doc["nccl_sweep"] == {"skipped": "--simulate: no NCCL to tune"}
    assert "NCCL settings sweep: --simulate: no NCCL to tune" in proc.stdout


def test_the_check_runs_the_burnin_node_program_with_the_nvml_backend_and_cuda_collectives(tmp_path):
    """`--list` needs no GPU: the checks a run makes, and the config the node program would fetch."""
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--list", "--burnin-timeout", "200"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert {"nvml", "measure", "nccl", "burnin", "nccl_sweep"} == set(doc["checks"])
    plan = doc["burnin_plan"]
    assert (plan["backend"], plan["collective_device"], plan["world"], plan["rank"]) == ("nvml", "cuda:0", 1, 0)
    assert plan["nodes"] == [plan["node"]] and plan["pg_timeout_s"] == 200
    assert plan["dcgm_diag_level"] >= 1  # dcgmi diag runs where dcgmi is installed
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written
