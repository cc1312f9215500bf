"""The runner measures variants against fp32; the report, plots, HTML and audit records follow."""

from __future__ import annotations

import base64
import json

import pytest

from aidc.compress.config import BenchConfig
from aidc.compress.pareto import non_dominated
from aidc.compress.runner import check_targets, recommend, run_bench


def test_pareto_keeps_only_points_nothing_beats_in_both_cost_and_quality():
    points = [(10.0, 0.90), (5.0, 0.95), (5.0, 0.80), (20.0, 0.99), (20.0, 0.95)]
    assert non_dominated(points) == [False, True, False, True, False]


def test_pareto_keeps_ties():
    assert non_dominated([(1.0, 1.0), (1.0, 1.0)]) == [True, True]


# The slow tests below share one tiny benchmark run (~15 s on an idle 2-core machine).
@pytest.fixture(scope="module")
def tiny_results(tiny_digits):
    steps = []
    config = BenchConfig(quick=True, models=("digits-mlp",), repeats=3,
                         techniques=("prune-structured", "int8-dynamic", "distill", "fp16"))
    results = run_bench(config, progress=lambda what, done, total: steps.append((what, done, total)),
                        cases={"digits-mlp": tiny_digits})
    return results, steps


@pytest.mark.slow
def test_results_compare_every_variant_with_the_fp32_baseline(tiny_results):
    results, _ = tiny_results
    (model,) = results["models"]
    rows = {r["technique"]: r for r in model["rows"]}
    assert list(rows) == ["fp32", "prune-structured", "int8-dynamic", "distill", "fp16"]
    base = rows["fp32"]
    assert base["size_ratio"] == 1.0 and base["speedup_tp"] == 1.0 and base["quality_delta"] == 0
    for r in model["rows"]:
        assert r["disk_bytes"] > 0 and r["latency_b1_ms"] > 0 and r["throughput_per_s"] > 0
        assert r["size_ratio"] == pytest.approx(base["disk_bytes"] / r["disk_bytes"], rel=1e-3)
    assert rows["prune-structured"]["params"] < base["params"]
    assert rows["int8-dynamic"]["linear_ratio"] > 3
    assert rows["distill"]["param_ratio"] <= 0.25
    assert results["threads"] == 2 and results["torch"]


@pytest.mark.slow
def test_recommendation_names_a_variant_within_tolerance_or_keeps_fp32(tiny_results):
    results, _ = tiny_results
    (model,) = results["models"]
    line = model["recommendation"]
    assert line.startswith("digits-mlp: ")
    ok = [r for r in model["rows"][1:] if r["quality_drop"] <= 1.0 and r["speedup_tp"] >= 1 and r["size_ratio"] >= 1]
    if ok:
        assert "smaller" in line and "faster" in line
    else:
        assert "keep dense fp32" in line


def test_recommendation_refuses_variants_that_lose_too_much_quality():
    model = {"model": "m", "quality_key": "accuracy_pct", "rows": [
        {"label": "dense fp32", "quality_drop": 0, "pareto_latency": True, "pareto_size": True,
         "speedup_tp": 1, "size_ratio": 1},
        {"label": "crushed", "quality_drop": 5.0, "pareto_latency": True, "pareto_size": True,
         "speedup_tp": 9, "size_ratio": 9, "throughput_batch": 8, "quality_delta": -5.0, "quality_value": 90}]}
    assert "keep dense fp32" in recommend(model, 1.0, "pt")
    model["rows"][1]["quality_drop"], model["rows"][1]["quality_delta"] = 0.5, -0.5
    assert recommend(model, 1.0, "pt") == "m: crushed: 9.0x smaller, 9.0x faster at batch 8, -0.5 pt"


@pytest.mark.slow
def test_targets_are_checked_from_measured_rows(tiny_results):
    results, _ = tiny_results
    by_id = {t["id"]: t for t in results["targets"]}
    assert by_id["minilm-int8-dynamic"]["met"] is None  # model not run
    distill = by_id["digits-distill"]
    assert distill["measured"]["param_ratio"] <= 0.25
    assert distill["met"] == (distill["measured"]["quality_drop"] <= 2.0)
    assert check_targets([]) and all(t["met"] is None for t in check_targets([]))


@pytest.mark.slow
def test_progress_reaches_its_total(tiny_results):
    _, steps = tiny_results
    assert steps[-1][1] == steps[-1][2] and steps[-1][0] == "done"
    assert [s[1] for s in steps] == sorted(s[1] for s in steps)


@pytest.mark.slow
def test_outputs_json_png_html_and_audit_records(tiny_results, tmp_path):
    from aidc.audit.log import AuditLog
    from aidc.compress import report

    results, _ = tiny_results
    paths = report.write_outputs(results, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["model"] == "digits-mlp"
    png = (tmp_path / "out" / "pareto-digits-mlp.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    page = (tmp_path / "out" / "compress-report.html").read_text()
    assert page.startswith("<!doctype html>") and "Recommendation" in page and paths["html"].endswith(".html")

    section = report.html_section(results)
    assert "<html" not in section and section.startswith("<section")
    b64 = section.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(b64).startswith(b"\x89PNG")

    text = report.text_report(results)
    assert "structured pruning 50%" in text and "recommendation:" in text

    seqs = report.audit_results(results, tmp_path / "audit.db")
    with AuditLog(tmp_path / "audit.db") as log:
        recs = log.records(kind="compress.result")
        assert log.verify().ok
    assert [r.seq for r in recs] == seqs and recs[0].payload["model"] == "digits-mlp"
    assert recs[0].reason == results["models"][0]["recommendation"]
    assert len(recs[0].payload["rows"]) == 5

    # The audit report shows the same tables and plots, rebuilt from the records alone.
    from aidc.audit.report import write_report

    with AuditLog(tmp_path / "audit.db") as log:
        html_path, _, _ = write_report(log, tmp_path / "report")
    audit_page = html_path.read_text()
    assert "Compression benchmarks" in audit_page and "data:image/png;base64," in audit_page
    assert results["models"][0]["recommendation"] in audit_page
