"""DCGM diagnostics where present: `dcgmi diag -r LEVEL -j` parsed from recorded real outputs
(tests/burnin/data/dcgm/SOURCES.md says where each came from) and folded into the verdict."""

import os
from pathlib import Path

import pytest

from aidc.burnin import dcgm
from aidc.burnin.judge import judge
from aidc.burnin.report import NodeResult
from aidc.errors import SpecError
from aidc.spec import parse_spec

DATA = Path(__file__).parent / "data" / "dcgm"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def by_test(diag):
    return {(r["test"], r["gpu"]): r["status"] for r in diag["results"]}


def test_dcgm4_level1_document_from_a_gb10_parses_per_test_and_gpu():
    diag = dcgm.parse_diag(recorded("dcgm-4.2.3-gb10-r1.json"))
    assert (diag["version"], diag["driver"]) == ("4.2.3", "580.82.09")
    assert by_test(diag) == {("software", 0): "fail"}
    assert "Persistence mode for GPU 0 is disabled" in diag["results"][0]["warnings"][0]


def test_dcgm4_diagnostic_results_of_eight_gpus_all_pass():
    diag = dcgm.parse_diag(recorded("dcgm-4-r3-8gpu-diagnostic.json"))
    assert by_test(diag) == {("diagnostic", i): "pass" for i in range(8)}
    assert {r["category"] for r in diag["results"]} == {"Hardware"}


def test_dcgm3_document_lists_every_gpu_of_a_csv_and_reads_upper_case_status_words():
    diag = dcgm.parse_diag(recorded("dcgm-3-nvvs-r1-persistence.json"))
    statuses = by_test(diag)
    assert {statuses[("Persistence Mode", g)] for g in range(4)} == {"fail"}
    assert statuses[("Denylist", 2)] == "pass" and statuses[("Inforom", 3)] == "skip"


def test_text_before_the_document_is_skipped_and_no_document_is_an_error():
    assert by_test(dcgm.parse_diag("Successfully ran diagnostic for group.\n" + recorded("dcgm-4.2.3-gb10-r1.json")))
    for text in ("", "Error: unable to establish a connection to the specified host: localhost", "{not json",
                 '{"DCGM Diagnostic": {"test_categories": 3}}', "[1]"):
        with pytest.raises(ValueError):
            dcgm.parse_diag(text)


def test_a_status_word_dcgm_never_printed_is_not_read_as_a_pass():
    doc = '{"DCGM Diagnostic": {"test_categories": [{"category": "Hardware", "tests": [{"name": "memory",' \
          ' "results": [{"entity_group": "GPU", "entity_id": 0, "status": "Inconclusive"}]}]}]}}'
    reasons, notes, failed = dcgm.verdict({"present": True, "level": 1, **dcgm.parse_diag(doc)})
    assert failed == [0] and reasons


def node_with(dcgm_result):
    return {"a": NodeResult("a", "SIM", False, metrics={"gemm_fp32_tflops": 1.0, "gemm_bf16_tflops": 1.0,
                                                        "memcpy_gbps": 1.0},
                            training={"loss_before": 1.0, "loss_after": 0.1, "param_digest": "d"},
                            parallel={m: {"loss_before": 1.0, "loss_after": 0.1, "param_digest": "e"}
                                      for m in ("fsdp", "pipeline")}, dcgm=dcgm_result)}


@pytest.mark.parametrize("name,failed", [("dcgm-4.2.3-gb10-r1.json", [0]), ("dcgm-4-r3-8gpu-diagnostic.json", []),
                                         ("dcgm-3-nvvs-r1-persistence.json", [0, 1, 2, 3])])
def test_each_failed_dcgm_test_fails_its_gpus_and_the_node(name, failed):
    nodes = node_with({"present": True, "level": 1, **dcgm.parse_diag(recorded(name))})
    judge(nodes, {}, 0.25, 0.1)
    assert nodes["a"].failed_gpus == failed
    assert nodes["a"].passed == (not failed)
    assert all("DCGM" in r for r in nodes["a"].reasons)


def test_absence_of_dcgmi_is_stated_not_failed(tmp_path):
    result = dcgm.run_diag(1, 10.0, path=str(tmp_path))
    assert result["present"] is False
    nodes = node_with(result)
    judge(nodes, {}, 0.25, 0.1)
    assert nodes["a"].passed
    assert any("dcgmi" in n and "not run" in n for n in nodes["a"].notes)


def fake_dcgmi(bin_dir: Path, output: Path, code: int = 0) -> Path:
    """A `dcgmi` on PATH that prints a recorded document and notes its arguments."""
    argv = bin_dir / "argv"
    script = bin_dir / "dcgmi"
    script.write_text(f'#!/bin/sh\necho "$@" > {argv}\ncat {output}\nexit {code}\n')
    script.chmod(0o755)
    return argv


def test_dcgmi_runs_at_the_spec_level_and_its_document_is_the_result(tmp_path):
    argv = fake_dcgmi(tmp_path, DATA / "dcgm-4.2.3-gb10-r1.json", code=226)
    result = dcgm.run_diag(3, 10.0, path=f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    assert argv.read_text().split() == ["diag", "-r", "3", "-j"]
    assert result["present"] and result["level"] == 3 and result["exit_code"] == 226
    assert by_test(result) == {("software", 0): "fail"}


def test_dcgmi_that_prints_no_document_fails_the_node_with_its_output(tmp_path):
    junk = tmp_path / "out.txt"
    junk.write_text("Error: unable to establish a connection to the specified host: localhost\n")
    fake_dcgmi(tmp_path, junk, code=1)
    result = dcgm.run_diag(1, 10.0, path=f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    nodes = node_with(result)
    judge(nodes, {}, 0.25, 0.1)
    assert not nodes["a"].passed and "unable to establish a connection" in nodes["a"].reasons[0]


def test_the_spec_names_the_diag_level_between_one_and_four():
    base = {"name": "s", "device_backend": "sim", "node_pools": [{"name": "n", "count": 1, "gpu_model": "SIM", "gpus_per_node": 1}]}
    assert parse_spec(base).policy.burnin.dcgm_diag_level == 1
    assert parse_spec({**base, "policy": {"burnin": {"dcgm_diag_level": 3}}}).policy.burnin.dcgm_diag_level == 3
    for bad in (0, 5):
        with pytest.raises(SpecError, match="dcgm_diag_level"):
            parse_spec({**base, "policy": {"burnin": {"dcgm_diag_level": bad}}})
