"""Stored per-GPU-model baselines: what a node is judged against when the run has no fleet (one
node recertified alone), and what a whole fleet cannot outvote."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aidc.audit.log import AuditLog
from aidc.burnin import baseline
from aidc.burnin.judge import judge
from aidc.burnin.report import NodeResult
from aidc.errors import BurninError

TRAINED = {"loss_before": 1.0, "loss_after": 0.2, "param_digest": "a" * 64, "steps": 10}
SHARDED = {**TRAINED, "param_digest": "f" * 64, "max_abs_diff_vs_ddp": 6e-8}
SIM_BASELINE = {"SIM": {"gemm_fp32_tflops": 2.4, "gemm_bf16_tflops": 1.0, "memcpy_gbps": 10.0}}


def node(name, fp32, model="SIM", memcpy=10.0):
    return NodeResult(name, model, False, metrics={"gemm_fp32_tflops": fp32, "gemm_bf16_tflops": 1.0,
                                                   "memcpy_gbps": memcpy},
                      training=dict(TRAINED), parallel={"fsdp": dict(SHARDED), "pipeline": dict(SHARDED)})


def judged(nodes, baselines, tolerance=0.25, min_busbw_fraction=0.0):
    nodes = {n.node: n for n in nodes}
    judge(nodes, {}, tolerance, 0.1, link_rate_gbps=1.25, min_busbw_fraction=min_busbw_fraction,
          baselines=baselines)
    return nodes


def test_a_lone_node_far_below_its_models_baseline_fails_naming_the_baseline():
    nodes = judged([node("gpu-3", 1.2)], SIM_BASELINE)
    assert nodes["gpu-3"].passed is False
    assert [r for r in nodes["gpu-3"].reasons if "baseline" in r] == [
        "gemm_fp32_tflops 1.2 TFLOP/s is 50% below the SIM baseline 2.4 TFLOP/s (tolerance 25%)"]


def test_a_lone_healthy_node_passes_against_the_baseline():
    assert judged([node("gpu-3", 2.3)], SIM_BASELINE)["gpu-3"].passed is True


def test_a_uniformly_slow_fleet_cannot_outvote_the_baseline():
    nodes = judged([node(f"gpu-{i}", 1.0) for i in range(4)], SIM_BASELINE)
    assert [n.passed for n in nodes.values()] == [False] * 4


def test_a_baseline_of_another_gpu_model_does_not_apply():
    nodes = judged([node("gpu-3", 1.2, model="H100")], SIM_BASELINE)
    assert nodes["gpu-3"].passed is True


def test_a_lone_node_is_not_failed_by_the_link_floor_of_a_collective_it_ran_alone():
    """One rank moves no bytes over the fabric (bus factor 0): the link-rate floor cannot apply."""
    lone = node("gpu-3", 2.4)
    lone.collectives = {"all_reduce": [{"bytes": 4096, "busbw_gbps": 0.0, "link_fraction": 0.0, "correct": True}]}
    lone.metrics["allreduce_busbw_gbps"] = 0.0
    nodes = judged([lone], SIM_BASELINE, min_busbw_fraction=0.25)
    assert nodes["gpu-3"].passed is True
    assert any("one rank" in note for note in nodes["gpu-3"].notes)


@settings(max_examples=60, deadline=None)
@given(base=st.floats(0.5, 1000), ratio=st.floats(0.01, 3), tolerance=st.floats(0.05, 0.9))
def test_a_lone_node_passes_exactly_when_it_is_within_tolerance_of_the_baseline(base, ratio, tolerance):
    value = base * ratio
    nodes = judged([node("n", value)], {"SIM": {"gemm_fp32_tflops": base}}, tolerance=tolerance)
    assert nodes["n"].passed is (value >= base * (1 - tolerance))


def _certify(audit, name, verdict, fp32, memcpy=10.0):
    audit.append("burnin.certificate", f"{verdict} burn-in", actor="t", node=name, payload={
        "verdict": verdict, "metrics": {"gemm_fp32_tflops": fp32, "gemm_bf16_tflops": 1.0, "memcpy_gbps": memcpy,
                                        "allreduce_busbw_gbps": 3.0}})


def test_recording_takes_each_models_median_over_the_latest_passing_certificates(tmp_path):
    models = {"gpu-0": "SIM", "gpu-1": "SIM", "gpu-2": "SIM", "h-0": "H100"}
    with AuditLog(tmp_path / "audit.db") as audit:
        _certify(audit, "gpu-0", "pass", 1.0)   # superseded by gpu-0's later certificate
        _certify(audit, "gpu-0", "pass", 2.0)
        _certify(audit, "gpu-1", "pass", 4.0, memcpy=20.0)
        _certify(audit, "gpu-2", "fail", 0.1)   # a failed node is no reference
        _certify(audit, "h-0", "pass", 50.0)
        path = tmp_path / "baselines.json"
        first = baseline.record(path, audit, models)
        again = baseline.record(path, audit, models)
    assert baseline.load(path) == {"SIM": {"gemm_fp32_tflops": 3.0, "gemm_bf16_tflops": 1.0, "memcpy_gbps": 15.0},
                                   "H100": {"gemm_fp32_tflops": 50.0, "gemm_bf16_tflops": 1.0, "memcpy_gbps": 10.0}}
    assert first["models"]["SIM"]["nodes"] == ["gpu-0", "gpu-1"]
    assert (first["revision"], again["revision"]) == (1, 2)  # versioned: each recording is a new revision


def test_recording_without_a_passing_certificate_is_an_error_and_writes_nothing(tmp_path):
    with AuditLog(tmp_path / "audit.db") as audit:
        _certify(audit, "gpu-0", "fail", 0.1)
        with pytest.raises(BurninError, match="no passing burn-in certificate"):
            baseline.record(tmp_path / "b.json", audit, {"gpu-0": "SIM"})
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    (json.dumps({"schema": 99, "revision": 1, "models": {}}), "schema 99"),
    (json.dumps({"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"gemm_fp32_tflops": "fast"}}}}),
     "gemm_fp32_tflops"),
    (json.dumps({"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"gemm_fp32_tflops": -1}}}}),
     "gemm_fp32_tflops"),
    (json.dumps({"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"no_such_metric": 1.0}}}}),
     "no_such_metric"),
])
def test_a_bad_baseline_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(BurninError, match=message) as err:
        baseline.load(path)
    assert "\n" not in str(err.value)


def test_no_baseline_file_means_no_baselines(tmp_path):
    assert baseline.load(tmp_path / "none.json") == {}


def test_aidc_burnin_baseline_record_stores_the_stacks_models_from_the_audit_log(aidc_cli, tmp_path):
    lab = tmp_path / "lab"
    with AuditLog(lab / "audit.db") as audit:
        for i, fp32 in enumerate((2.0, 3.0, 4.0)):
            _certify(audit, f"gpu-{i}", "pass", fp32)
    out = aidc_cli("burnin", "baseline", "record", "--stack", "lab", "--lab-dir", str(lab), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["revision"] == 1 and doc["models"]["SIM"]["nodes"] == ["gpu-0", "gpu-1", "gpu-2"]
    assert baseline.load(lab / "burnin-baselines.json")["SIM"]["gemm_fp32_tflops"] == 3.0
    shown = json.loads(aidc_cli("burnin", "baseline", "show", "--lab-dir", str(lab), "--json", check=True).stdout)
    assert shown["models"] == baseline.load(lab / "burnin-baselines.json")


def test_aidc_burnin_baseline_record_without_an_audit_log_is_one_clear_error(aidc_cli, tmp_path):
    out = aidc_cli("burnin", "baseline", "record", "--stack", "lab", "--lab-dir", str(tmp_path / "none"))
    assert out.returncode != 0 and "Traceback" not in out.stderr and "no audit log at" in out.stderr
