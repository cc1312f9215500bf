"""bench/burnin_overhead.py: the burn-in's GEMM and all_reduce against bare loops of the same sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "burnin_overhead.py"


def test_bad_arguments_are_one_error_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(BENCH), "--ranks", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "burnin_overhead: error: --ranks must be >= 2, --repeats >= 1, --gemm-size >= 16"


@pytest.mark.slow
def test_the_bench_pairs_harness_and_bare_runs_of_every_size_and_reports_each_ratio():
    proc = subprocess.run([sys.executable, str(BENCH), "--ranks", "2", "--repeats", "2", "--gemm-size", "32",
                           "--max-bytes", "8192", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert set(doc["ratios"]) == {"gemm_fp32", "gemm_bf16", "all_reduce"} and doc["goal"] == 0.95
    assert all(r > 0 for r in doc["ratios"].values())
    assert doc["meets_goal"] == all(r >= 0.95 for r in doc["ratios"].values())
    assert [row["bytes"] for row in doc["all_reduce"]["sizes"]] == [4096, 8192]
    gemm = doc["gemm"]["fp32"]
    # GEMM is compared on the clock the harness itself times simulated GPUs with.
    assert gemm["harness_clock"] == "thread_cpu" and gemm["size"] == 32 and gemm["matmuls_per_sample"] >= 1
