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
