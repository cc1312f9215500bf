"""The goodput bench's ETTR model, fed only with costs, against the accounting of a timeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from aidc.goodput import StepLog, account, read_step_log

BENCH = Path(__file__).resolve().parents[2] / "bench" / "goodput.py"


def _bench():
    spec = importlib.util.spec_from_file_location("goodput_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predicted_ettr_matches_a_timeline_with_periodic_faults_and_uneven_resumes(tmp_path):
    """Steps of 0.1 s, a 0.01 s stall per checkpoint every step, a fault every 60 s that cuts a
    step short, resumes of 3, 9 and 4 s: the model, given the measured resumes and checkpoint
    costs, lands within 5% of the accounting."""
    log = StepLog(tmp_path / "g.jsonl", job="j")
    log.allocation(t=0.0)
    log.start(resumed_from=0, t=0.0)
    t, step, resumes = 0.0, 0, iter([3.0, 9.0, 4.0])
    next_fault = 60.0
    while t < 240.0:
        if t + 0.1 > next_fault:  # the fault strikes in the middle of this step
            resume = next(resumes, None)
            if resume is None:
                break
            log.fault(t=next_fault, node="n", detected_t=next_fault + 0.05)
            log.start(resumed_from=step, t=next_fault + resume - 0.5)
            t, next_fault = next_fault + resume, next_fault + 60.0
            continue
        step += 1
        log.step_done(step, t, t + 0.1)
        log.checkpoint(step, t + 0.1, t + 0.11, "sync")
        t += 0.11
    log.end(t=t)
    g = account(read_step_log(tmp_path / "g.jsonl"))
    model = _bench().predict(g, g.resume_s, faults=3)
    assert g.resume_s == pytest.approx([3.0, 9.0, 4.0])
    assert model["predicted_ettr"] == pytest.approx(g.ettr, rel=0.05)
    assert model["resume_s_mean"] == pytest.approx(16.0 / 3, abs=1e-3)
