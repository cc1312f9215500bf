"""Checkpoint-interval advice: Young's and Daly's intervals, Daly's expected ETTR, the MTBF."""

from __future__ import annotations

import json
import math

import pytest

from aidc.audit import AuditLog
from aidc.goodput import AdviceError, StepLog, job_advice
from aidc.goodput.advice import daly_interval, expected_ettr, young_interval


@pytest.mark.parametrize("mtbf_min, tau_min", [(24 * 60, 117), (6 * 60, 57), (15, 9.1)])
def test_daly_interval_matches_the_papers_figures(mtbf_min, tau_min):
    # Daly 2006, figs. 3-5: delta = 5 min, R = 10 min; the model predicts these optima.
    assert daly_interval(5 * 60, mtbf_min * 60) / 60 == pytest.approx(tau_min, abs=0.5 if tau_min > 10 else 0.05)


def test_young_and_daly_agree_when_the_save_cost_is_small_and_daly_caps_at_mtbf():
    assert young_interval(2.0, 3600.0) == pytest.approx(math.sqrt(2 * 2.0 * 3600.0))
    assert daly_interval(2.0, 3600.0) == pytest.approx(young_interval(2.0, 3600.0), rel=0.02)
    assert daly_interval(100.0, 40.0) == 40.0  # delta >= 2M: checkpoint once per MTBF


def test_expected_ettr_is_best_near_the_advised_interval():
    delta, m, r = 10.0, 3600.0, 60.0
    best = daly_interval(delta, m)
    at_best = expected_ettr(best, delta, m, r)
    assert at_best > expected_ettr(best / 4, delta, m, r) and at_best > expected_ettr(best * 4, delta, m, r)
    assert 0 < at_best < 1


def _log_with_checkpoints(path, stall_s=0.1):
    log = StepLog(path, job="j")
    log.start(resumed_from=0, world=["a", "b"], t=0.0)
    t = 0.0
    for n in range(1, 11):
        log.step_done(n, t, t + 1.0)
        log.checkpoint(n, t + 1.0, t + 1.0 + stall_s, "sync")
        t += 1.0 + stall_s


def test_advice_from_the_step_log_and_a_given_mtbf(tmp_path):
    _log_with_checkpoints(tmp_path / "g.jsonl")
    a = job_advice(tmp_path / "g.jsonl", mtbf_s=3600, restart_s=30)
    assert a["save_cost_s"] == pytest.approx(0.1)
    assert a["advised_interval_s"] == pytest.approx(daly_interval(0.1, 3600), abs=1e-3)
    assert a["current_interval_s"] == pytest.approx(1.0)  # checkpoints 1.1 s apart, 0.1 s of them the stall
    assert a["advised_interval_steps"] == round(a["advised_interval_s"] / 1.0)
    assert a["expected_ettr_advised"] > a["expected_ettr_current"]
    assert a["restart_source"] == "given"


def test_advice_without_an_mtbf_says_what_it_needs(tmp_path, aidc_cli):
    _log_with_checkpoints(tmp_path / "g.jsonl")
    with pytest.raises(AdviceError, match="MTBF unknown: give .*--mtbf-s SECONDS.*--audit-db"):
        job_advice(tmp_path / "g.jsonl")
    r = aidc_cli("goodput", "advise", "--job", str(tmp_path / "g.jsonl"))
    assert r.returncode == 2 and r.stderr.startswith("aidc: error: MTBF unknown") and r.stdout == ""
    as_json = aidc_cli("goodput", "advise", "--job", str(tmp_path / "g.jsonl"), "--json")
    assert as_json.returncode == 2 and as_json.stdout == ""
    assert json.loads(as_json.stderr)["error"].startswith("MTBF unknown")


def test_an_audit_log_without_fatal_faults_leaves_the_mtbf_unknown(tmp_path):
    _log_with_checkpoints(tmp_path / "g.jsonl")
    with AuditLog(tmp_path / "audit.db") as log:
        log.append("lab.start", "start", actor="t", node="a")
        log.append("failover.decision", "no action", actor="t", node="a", payload={"verdict": "no_action"})
    with pytest.raises(AdviceError, match="MTBF unknown: the audit log .* holds no fatal fault"):
        job_advice(tmp_path / "g.jsonl", audit_db=tmp_path / "audit.db")


def test_mtbf_from_the_audit_log_scales_the_fleets_fault_rate_to_the_jobs_nodes(tmp_path, aidc_cli):
    _log_with_checkpoints(tmp_path / "g.jsonl")  # a job on 2 nodes
    with AuditLog(tmp_path / "audit.db") as log:
        for node in ("a", "b", "c", "d"):  # a fleet of 4
            log.append("burnin.certificate", "pass", actor="t", node=node)
        log.append("failover.decision", "quarantine", actor="t", node="b", payload={"verdict": "quarantine"})
        log.append("failover.decision", "quarantine", actor="t", node="c", payload={"verdict": "quarantine"})
        records = log.records()
    window = records[-1].ts - records[0].ts
    r = aidc_cli("goodput", "advise", "--job", str(tmp_path / "g.jsonl"), "--audit-db", str(tmp_path / "audit.db"),
                 "--json")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert a["mtbf"]["faults"] == 2 and a["mtbf"]["fleet_nodes"] == 4 and a["mtbf"]["job_nodes"] == 2
    assert a["mtbf"]["seconds"] == pytest.approx(window * 4 / (2 * 2), rel=1e-3, abs=1e-3)
