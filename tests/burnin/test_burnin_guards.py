"""Burn-in inputs that would certify nothing, or crash, are refused; the lab's straggler
simulation scales with the slowdown factor."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from aidc.burnin.runner import _node_result
from aidc.lab.trainer import _straggle
from aidc.spec import BurninPolicy


def test_an_all_reduce_range_without_a_power_of_two_is_a_spec_error():
    with pytest.raises(ValidationError, match="holds no power of two"):
        BurninPolicy(allreduce_min_bytes=5000, allreduce_max_bytes=8000)
    assert BurninPolicy(allreduce_min_bytes=4096, allreduce_max_bytes=4096)


def test_a_node_whose_sweep_measured_nothing_is_not_certified_as_correct():
    class Node:
        name, gpu_model, spare = "gpu-0", "SIM", False

    raw = {"metrics": {}, "collectives": {"all_reduce": []}, "gpus": [], "training": {}, "errors": []}
    assert _node_result(Node, raw, link_rate=1.25).errors == [
        f"the {op} sweep measured no size" for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast",
                                                      "all_to_all")]


def test_burnin_refuses_a_non_positive_timeout_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aidc", "burnin", "run", "--lab-dir", str(tmp_path), "--timeout", "-5"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "--timeout" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("slowdown", "passes"), [(1.0, 0), (1.1, 10), (1.5, 50), (2.0, 100)])
def test_a_slow_simulated_gpu_spends_the_factor_more_compute_time(slowdown, passes):
    """Work is added until (factor - 1) x the step's compute CPU time is spent: each fake pass
    below costs 1 ms of a fake clock, against a 100 ms step."""
    now = [0.0]

    def module(rows):
        now[0] += 0.001
        assert rows.shape[0] <= 16  # small passes: a 10% slowdown is not rounded to a whole step

    assert _straggle(module, slowdown, 0.1, torch.zeros(256, 4), clock=lambda: now[0]) in (passes, passes + 1)
    assert _straggle(module, slowdown, 0.1, torch.zeros(256, 4), clock=lambda: 0.0, max_passes=7) == \
        (7 if slowdown > 1 else 0)  # a clock that never moves cannot make it spin for ever
