"""`aidc tune prefetch`: the prefetch model (cache = sum of stream rate x transfer time / prefetch
time) turned into DataLoader settings, measured on real files, with clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aidc.tune.prefetch import (DatasetError, FileDataset, Measured, advise, decode, make_dataset, sample_files)


def measured(sample_s: float, step_s: float, batch: int = 10, p90: float | None = None) -> Measured:
    return Measured(files=100, mean_file_bytes=1000.0, read_mb_s=100.0, files_per_s=1000.0, sample_s=sample_s,
                    batch_load_s=sample_s * batch, batch_load_s_p90=(p90 or sample_s) * batch, step_s=step_s,
                    batch_size=batch)


def test_a_batch_that_takes_three_steps_to_load_needs_three_workers_and_that_cache():
    a = advise(measured(sample_s=0.003, step_s=0.010), cores=8)  # transfer 30 ms, step 10 ms
    assert a.cache_batches == pytest.approx(3.0)
    assert a.cache_bytes == pytest.approx(1000 * 10 / 0.010 * 0.030)  # rate x transfer
    assert (a.num_workers, a.workers_needed, a.input_bound) == (3, 3, False)
    assert a.prefetch_factor == 2  # one batch each, torch's floor of two
    assert a.expected_step_s == pytest.approx(0.010)


def test_streams_sharing_a_node_add_their_caches_and_share_its_cores():
    a = advise(measured(sample_s=0.003, step_s=0.010), streams=2, cores=8)
    assert a.cache_batches == pytest.approx(6.0)
    assert a.num_workers == 3  # per stream: (8 cores - 2 trainers) / 2 streams leaves 3 each


def test_fewer_cores_than_workers_needed_is_called_input_bound_with_the_step_it_will_take():
    # transfer 50 ms: five workers needed; two cores, of which the 10 ms step takes 0.4 once fed every 25 ms
    a = advise(measured(sample_s=0.005, step_s=0.010), cores=2)
    assert (a.num_workers, a.workers_needed, a.input_bound) == (2, 5, True)
    assert a.expected_step_s == pytest.approx(0.025)
    assert a.prefetch_factor == 3  # the cache of five batches spread over the two workers
    assert advise(measured(sample_s=0.005, step_s=0.040), cores=2).num_workers == 1  # a busy trainer keeps its core


def test_a_fast_loader_needs_one_worker_and_jitter_deepens_the_queue_within_bounds():
    assert advise(measured(sample_s=0.0001, step_s=0.010), cores=4).num_workers == 1
    calm = advise(measured(sample_s=0.003, step_s=0.010, p90=0.003), cores=2)
    jittery = advise(measured(sample_s=0.003, step_s=0.010, p90=0.009), cores=2)
    assert jittery.prefetch_factor > calm.prefetch_factor
    assert advise(measured(sample_s=0.1, step_s=0.001, p90=10.0), cores=2).prefetch_factor == 16


def test_the_lab_dataset_is_real_compressed_files_that_decode_to_model_inputs(tmp_path):
    made = make_dataset(tmp_path / "ds", samples=5, sample_kib=4)
    files = sample_files(tmp_path / "ds")
    assert len(files) == made["samples"] == 5 and made["bytes"] == sum(f.stat().st_size for f in files)
    x, y = FileDataset(files, 64)[2]
    assert x.shape == (64,) and y.shape == (1,)
    assert made["bytes"] < 5 * 4096, "compressed: reading a sample costs a decode"


def test_missing_empty_and_foreign_datasets_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        sample_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no samples here")
    with pytest.raises(DatasetError, match=r"holds no \*\.sample files"):
        sample_files(tmp_path / "empty")
    foreign = tmp_path / "x.sample"
    foreign.write_bytes(b"JPEG....")
    with pytest.raises(DatasetError, match="not an aidc lab sample"):
        decode(foreign, 64)
    corrupt = tmp_path / "y.sample"
    corrupt.write_bytes(b"AIDCSMP1" + b"\x00" * 10)
    with pytest.raises(DatasetError, match="corrupt"):
        decode(corrupt, 64)
    with pytest.raises(DatasetError, match="--samples"):
        make_dataset(tmp_path / "z", samples=0)


def _aidc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aidc", "tune", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_cli_bad_input_is_one_error_line_without_a_traceback(tmp_path):
    missing = _aidc("prefetch", "--dataset", str(tmp_path / "nope"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "aidc: error: dataset directory" in missing.stderr and "does not exist" in missing.stderr
    as_json = _aidc("prefetch", "--dataset", str(tmp_path / "nope"), "--json")  # the error as JSON on stderr
    assert as_json.returncode == 2 and as_json.stdout == "" and "does not exist" in json.loads(as_json.stderr)["error"]
    (tmp_path / "empty").mkdir()
    empty = _aidc("prefetch", "--dataset", str(tmp_path / "empty"))
    assert empty.returncode != 0 and "holds no *.sample files" in empty.stderr and "Traceback" not in empty.stderr
    make_dataset(tmp_path / "few", samples=3, sample_kib=1)
    few = _aidc("prefetch", "--dataset", str(tmp_path / "few"), "--batch-size", "8")
    assert few.returncode == 2 and "fewer than one batch of 8" in few.stderr
    helped = _aidc("prefetch", "--help")
    assert helped.returncode == 0 and "--dataset" in helped.stdout and "--json" in helped.stdout


@pytest.mark.slow
def test_cli_measures_advises_and_trains_before_and_after_from_a_real_dataloader(tmp_path):
    made = _aidc("make-dataset", "--dataset", str(tmp_path / "ds"), "--samples", "96", "--sample-kib", "8", "--json")
    assert made.returncode == 0, made.stderr
    proc = _aidc("prefetch", "--dataset", str(tmp_path / "ds"), "--batch-size", "16", "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["measured"]["files"] == 96 and out["measured"]["read_mb_s"] > 0 and out["measured"]["step_s"] > 0
    advice = out["advice"]
    assert advice["num_workers"] >= 1 and 2 <= advice["prefetch_factor"] <= 16
    before, after = out["compare"]["before"], out["compare"]["after"]
    assert (before["num_workers"], before["steps"], len(before["rounds_step_s"])) == (0, 4, 2)
    assert (after["num_workers"], after["prefetch_factor"]) == (advice["num_workers"], advice["prefetch_factor"])
    assert after["steps"] == 4 and before["step_s"] > 0 and after["step_s"] > 0
