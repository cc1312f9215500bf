"""NCCL settings from measurement (bench/nccl_sweep.py): which settings the search tries and keeps,
the proposal it writes from measured rows, and a trial process that says why it cannot measure
here. There is no GPU on this machine: no test pretends to measure NCCL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from nccl_sweep import (SweepError, coordinate_sweep, load_knobs, nccl_conf_text, run_trial,  # noqa: E402
                        write_proposal)

sys.path.remove(str(ROOT / "bench"))

KNOBS = [{"name": "NCCL_ALGO", "values": ["Ring", "Tree"]}, {"name": "NCCL_PROTO", "values": ["LL", "Simple"]}]


class Recorded:
    """Trial results looked up by the environment a trial was given, recording every call."""

    def __init__(self, scores: dict[tuple, float | str]):
        self.scores, self.calls = scores, []

    def __call__(self, env: dict[str, str]) -> dict:
        self.calls.append(dict(env))
        score = self.scores[tuple(sorted(env.items()))]
        return {"env": env, "error": score, "exit_code": 1} if isinstance(score, str) else {"score_gbps": score}


def test_the_knobs_file_names_the_four_settings_the_issue_asks_for():
    names = [k["name"] for k in load_knobs()["knobs"]]
    assert names == ["NCCL_ALGO", "NCCL_PROTO", "NCCL_MIN_NCHANNELS", "NCCL_IB_QPS_PER_CONNECTION"]


def test_each_knob_is_tried_with_the_best_values_so_far_and_kept_only_when_clearly_better():
    trial = Recorded({(): 100.0, (("NCCL_ALGO", "Ring"),): 103.0, (("NCCL_ALGO", "Tree"),): 120.0,
                      (("NCCL_ALGO", "Tree"), ("NCCL_PROTO", "LL")): 90.0,
                      (("NCCL_ALGO", "Tree"), ("NCCL_PROTO", "Simple")): 124.0})
    result = coordinate_sweep(KNOBS, trial, trials=1, min_gain=0.05)
    # Tree beat the baseline by 20%: kept. Simple beat Tree by 3.3%, under 5%: NCCL's default stays.
    assert result["best"] == {"NCCL_ALGO": "Tree"}
    assert (result["baseline_gbps"], result["best_gbps"]) == (100.0, 120.0)
    assert trial.calls == [{}, {"NCCL_ALGO": "Ring"}, {"NCCL_ALGO": "Tree"}, {"NCCL_ALGO": "Tree", "NCCL_PROTO": "LL"},
                           {"NCCL_ALGO": "Tree", "NCCL_PROTO": "Simple"}]


def test_a_setting_is_judged_by_the_median_of_its_trials_and_a_failing_setting_is_never_chosen():
    runs = iter([100.0, 100.0, 100.0, "ncclInvalidUsage", "ncclInvalidUsage", "ncclInvalidUsage", 300.0, 104.0, 106.0])
    calls = []

    def trial(env):
        calls.append(dict(env))
        score = next(runs)
        return {"error": score, "exit_code": 1} if isinstance(score, str) else {"score_gbps": score}

    result = coordinate_sweep(KNOBS[:1], trial, trials=3, min_gain=0.05)
    assert result["best"] == {"NCCL_ALGO": "Tree"}  # median 106: one 300 outlier does not decide
    assert result["best_gbps"] == 106.0 and len(calls) == 9
    ring = result["rows"][1]
    assert ring["env"] == {"NCCL_ALGO": "Ring"} and ring["median_gbps"] is None and len(ring["errors"]) == 3


def test_a_baseline_that_cannot_be_measured_stops_the_sweep_with_the_trials_reason_and_code():
    def trial(env):
        return {"env": env, "error": "torch 2.13.0+cpu sees no CUDA device", "exit_code": 3}

    with pytest.raises(SweepError, match="sees no CUDA device") as err:
        coordinate_sweep(KNOBS, trial, trials=2)
    assert err.value.code == 3


def test_the_proposal_is_nccl_conf_lines_and_the_roles_overrides_from_the_measured_rows(tmp_path):
    trial = Recorded({(): 100.0, (("NCCL_ALGO", "Ring"),): 99.0, (("NCCL_ALGO", "Tree"),): 130.0,
                      (("NCCL_ALGO", "Tree"), ("NCCL_PROTO", "LL")): 90.0,
                      (("NCCL_ALGO", "Tree"), ("NCCL_PROTO", "Simple")): 150.0})
    result = coordinate_sweep(KNOBS, trial, trials=1)
    paths = write_proposal(tmp_path, result, "gpu-host-1")
    conf = paths["nccl_conf"].read_text().splitlines()
    assert [line for line in conf if not line.startswith("#")] == ["NCCL_ALGO=Tree", "NCCL_PROTO=Simple"]
    assert all("=" not in line for line in conf if line.startswith("#"))  # NCCL would read such a line
    assert "100 GB/s with NCCL defaults, 150 GB/s" in conf[1] and "gpu-host-1" in conf[0]
    assert json.loads(paths["overrides"].read_text()) == {"aidc_nccl_overrides": {"NCCL_ALGO": "Tree",
                                                                                  "NCCL_PROTO": "Simple"}}
    assert len(json.loads(paths["sweep"].read_text())["rows"]) == 5


def test_when_nothing_beats_the_defaults_the_proposal_sets_nothing_and_says_so():
    result = {"best": {}, "baseline_gbps": 100.0, "best_gbps": 100.0, "rows": [{}], "trials": 2, "min_gain": 0.05}
    text = nccl_conf_text(result, "h")
    assert [line for line in text.splitlines() if not line.startswith("#")] == []
    assert "No setting beat NCCL's defaults" in text


def test_past_the_deadline_the_remaining_settings_are_listed_as_not_tried():
    trial = Recorded({(): 100.0})
    result = coordinate_sweep(KNOBS, trial, trials=1, deadline=0.0)  # long past
    assert trial.calls == [{}] and result["best"] == {}
    assert [r.get("skipped") for r in result["rows"][1:]] == ["the sweep's time budget was spent"] * 4


@pytest.mark.slow
def test_a_trial_is_a_fresh_process_that_sees_exactly_its_settings_and_refuses_without_cuda(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown")
    monkeypatch.setenv("NCCL_PROTO", "LL")  # a stray setting in the caller's environment is not inherited
    monkeypatch.setenv("NCCL_DEBUG", "WARN")  # one that is not swept is
    doc = run_trial({"NCCL_ALGO": "Tree"}, ["NCCL_ALGO", "NCCL_PROTO"], [], timeout_s=120)
    assert doc["exit_code"] == 3 and "sees no CUDA device" in doc["error"]
    assert doc["env"] == {"NCCL_ALGO": "Tree", "NCCL_DEBUG": "WARN"}


@pytest.mark.slow
def test_the_sweep_without_cuda_exits_3_with_one_line_and_proposes_nothing(tmp_path):
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "nccl_sweep.py"), "--out", str(tmp_path), "--trials",
                           "1"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3 and "sees no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "nothing proposed" in proc.stderr
    assert not (tmp_path / "nccl.conf").exists()
