"""Checkpoint storage in burn-in: sequential write to the end of fsync, read back past the page
cache, small-file metadata rate, on the node's checkpoint path; judged against the fleet with
the storage tolerance like every other node figure."""

from __future__ import annotations

import os

import pytest

from aidc.burnin.judge import judge
from aidc.burnin.report import NodeResult
from aidc.burnin.storage import STORAGE_METRICS, StorageBench
from aidc.burnin.worker import NodeBenches
from aidc.spec import load_stack

TRAINED = {"loss_before": 1.0, "loss_after": 0.2, "param_digest": "a" * 64, "steps": 10}


def test_a_storage_sample_measures_all_three_figures_and_leaves_nothing_behind(tmp_path):
    bench = StorageBench(tmp_path / "ckpt", 2 << 20, 25)
    bench.sample()
    bench.sample()
    result = bench.result()
    assert result.samples == 2 and result.nbytes == 2 << 20 and result.files == 25
    assert set(result.metrics()) == set(STORAGE_METRICS)
    assert all(v > 0 for v in result.metrics().values())
    assert list((tmp_path / "ckpt").iterdir()) == [], "the work directory is removed after each sample"


def test_an_unwritable_checkpoint_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot be created"):
        StorageBench(blocker / "ckpt", 1 << 20, 1)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OSError, match="not writable"):
            StorageBench(locked, 1 << 20, 1)


def test_too_small_a_storage_burn_in_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        StorageBench(tmp_path, 1000, 1)
    with pytest.raises(ValueError, match="at least one file"):
        StorageBench(tmp_path, 1 << 20, 0)


def test_a_node_whose_storage_fails_mid_run_fails_burn_in_with_the_reason(tmp_path):
    benches = NodeBenches({"storage_path": str(tmp_path / "ckpt"), "storage_bytes": 1 << 20, "storage_files": 5,
                           "backend": "sim", "backend_kwargs": {"node_dir": str(tmp_path / "missing")},
                           "device_timeout_s": 5.0})
    benches.setup()
    (tmp_path / "ckpt").rmdir()
    (tmp_path / "ckpt").write_text("the volume went away")
    benches.sample()
    assert any(e.startswith("checkpoint storage:") for e in benches.errors)
    assert benches.storage is None


def _fleet(**write_gbps) -> dict[str, NodeResult]:
    return {name: NodeResult(name, "SIM", False, training=dict(TRAINED),
                             parallel={"fsdp": dict(TRAINED), "pipeline": dict(TRAINED)}, metrics={
        "gemm_fp32_tflops": 1.0, "gemm_bf16_tflops": 1.0, "memcpy_gbps": 10.0,
        "storage_write_gbps": v, "storage_read_gbps": 2.0, "storage_metadata_ops": 5000.0})
        for name, v in write_gbps.items()}


def test_storage_is_judged_against_the_fleet_with_its_own_tolerance():
    nodes = _fleet(a=1.0, b=1.1, c=0.9, d=0.3, e=0.6)
    stats = judge(nodes, {}, 0.25, 0.1, metric_tolerance={m: 0.5 for m in STORAGE_METRICS})
    assert stats["storage_write_gbps"]["median"] == 0.9
    assert nodes["d"].reasons == ["storage_write_gbps 0.3 GB/s is 67% below the fleet median 0.9 GB/s"
                                  " (tolerance 50%)"]
    assert nodes["e"].passed, "33% below: inside the storage tolerance, though outside the GPU one"


def test_a_run_without_a_checkpoint_path_notes_that_storage_was_not_measured():
    nodes = _fleet(a=1.0, b=1.0)
    for n in nodes.values():
        for m in STORAGE_METRICS:
            del n.metrics[m]
    judge(nodes, {}, 0.25, 0.1)
    assert all(n.passed for n in nodes.values())
    assert "storage_write_gbps: not measured (no checkpoint path in this run)" in nodes["a"].notes


def test_the_lab_burns_in_small_storage_samples():
    burnin = load_stack("lab").policy.burnin
    assert burnin.storage_bytes <= 32 << 20 and burnin.storage_files <= 2000
