"""`aidc compress bench` rejects bad arguments with exit 2 and no traceback."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--technique", "int4-magic"], "unknown technique"),
    (["--model", "resnet"], "unknown model"),
    (["--threads", "0"], "threads"),
    (["--sparsity", "lots"], "sparsity"),
])
def test_bad_arguments_exit_2_with_a_message_and_no_traceback(aidc_cli, args, message):
    proc = aidc_cli("compress", "bench", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert message in (proc.stderr + proc.stdout).lower()


def test_help_lists_the_options(aidc_cli):
    proc = aidc_cli("compress", "bench", "--help")
    assert proc.returncode == 0
    for opt in ("--quick", "--json", "--out", "--audit-db", "--technique", "--sparsity"):
        assert opt in proc.stdout


@pytest.mark.slow
def test_bench_json_writes_outputs_and_audit_records(aidc_cli, tmp_path):
    import json

    out, db = tmp_path / "out", tmp_path / "audit.db"
    proc = aidc_cli("compress", "bench", "--quick", "--model", "digits-mlp", "--technique", "int8-dynamic",
                    "--json", "--out", str(out), "--audit-db", str(db), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    (model,) = results["models"]
    assert [r["technique"] for r in model["rows"]] == ["fp32", "int8-dynamic"]
    assert model["rows"][1]["linear_ratio"] > 3.5
    assert (out / "results.json").exists() and (out / "pareto-digits-mlp.png").exists()
    assert (out / "compress-report.html").exists()
    assert len(results["audit_seqs"]) == 1
    shown = aidc_cli("audit", "show", "--db", str(db), "--kind", "compress.result", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)[0]["payload"]["model"] == "digits-mlp"
