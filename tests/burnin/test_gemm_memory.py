"""GEMM and memory-copy measurements; a slowed simulated GPU really does more work."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aidc.burnin.gemm import GemmBench, SlowedMatmul, measure_gemm
from aidc.burnin.memory import COUNTING, measure_memcpy


def _flops_of_one_nominal_matmul(n: int, slowdown: float) -> int:
    a, b = torch.randn(n, n), torch.randn(n, n)
    step = SlowedMatmul(a, b, slowdown)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("slowdown", [1.0, 2.0, 4.0, 2.5])
def test_slowdown_executes_that_many_times_the_arithmetic_of_a_nominal_matmul(slowdown):
    n = 64
    assert _flops_of_one_nominal_matmul(n, slowdown) == pytest.approx(slowdown * 2 * n**3)


def test_slowdown_four_issues_four_matmuls_per_nominal_matmul():
    bench = GemmBench("cpu", "fp32", 32, slowdown=4.0, target_sample_s=0.0)
    bench.sample()
    bench.sample()
    nominal = 2 + 2 * bench.per_sample  # warm-up + calibration, then two samples
    result = bench.result()
    assert result.matmuls_executed == 4 * nominal
    assert result.work_factor == 4.0


def test_unslowed_gemm_issues_one_matmul_per_nominal_matmul():
    result = measure_gemm("cpu", "fp32", 32, repeats=2, target_sample_s=0.0)
    assert result.matmuls_executed == 2 + 2 * result.matmuls_per_sample
    assert result.tflops > 0 and result.samples == 2


def test_gemm_runs_in_bf16():
    result = measure_gemm("cpu", "bf16", 32, repeats=1, target_sample_s=0.0)
    assert result.dtype == "bf16" and result.tflops > 0


def test_gemm_throughput_is_nominal_flops_over_the_median_sample_time():
    r = measure_gemm("cpu", "fp32", 48, repeats=3, target_sample_s=0.0)
    assert r.tflops == pytest.approx(2 * 48**3 * r.matmuls_per_sample / r.median_s / 1e12)


def test_unknown_dtype_and_speedup_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        measure_gemm("cpu", "fp8", 16)
    with pytest.raises(ValueError, match="slowdown"):
        SlowedMatmul(torch.ones(2, 2), torch.ones(2, 2), 0.5)


def test_memcpy_counts_read_plus_write_bytes():
    r = measure_memcpy("cpu", 1 << 20, repeats=2, copies_per_sample=2)
    assert r.gbps == pytest.approx(2 * (1 << 20) * 2 / r.median_s / 1e9)
    assert r.counting == COUNTING and COUNTING.startswith("read+write")


def test_on_a_simulated_gpu_time_spent_waiting_for_a_core_is_not_device_time(monkeypatch):
    # The sim "device" is the calling thread: its CPU time, not wall time, so another
    # process's load on a shared machine does not read as a slow node.
    import time

    bench = GemmBench("cpu", "fp32", 16, target_sample_s=0.0)
    monkeypatch.setattr(bench, "step", lambda: time.sleep(0.2))
    assert bench.sample() < 0.1
    assert bench.clock_name == "thread_cpu"


def test_gpu_work_is_timed_by_wall_clock_between_synchronisations():
    from aidc.burnin.timing import device_clock

    assert device_clock("cuda:0")[0] == "wall" and device_clock("cpu")[0] == "thread_cpu"
