"""The burn-in's tests by name: a runbook's `tests:` is checked when the runbook loads, reaches the
node program through the launcher, and only what it names is run and judged."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from aidc.burnin.judge import judge
from aidc.burnin.report import NodeResult
from aidc.burnin.suite import ALL, collectives_of, select
from aidc.errors import BurninError
from aidc.runbook.catalog import RunbookError, load_runbook, parse_runbook, schema_path


def test_the_runbook_schema_lists_exactly_the_burnin_tests():
    schema = json.loads(schema_path().read_text())
    assert schema["$defs"]["burnin"]["properties"]["tests"]["items"]["enum"] == list(ALL)


def test_a_selection_runs_in_the_suites_order_and_none_or_empty_means_all():
    assert select(["train", "gemm"]) == ("gemm", "train")
    assert select(None) == select([]) == ALL
    assert collectives_of(["allreduce"]) == ("all_reduce",) and collectives_of(["gemm"]) == ()
    assert len(collectives_of(["collectives"])) == 5


def test_an_unknown_test_is_refused_naming_it_and_the_known_ones():
    with pytest.raises(BurninError) as err:
        select(["gemm", "gemmm"])
    assert "'gemmm'" in str(err.value) and all(t in str(err.value) for t in ALL)


RUNBOOK = {"name": "rb", "title": "Recertify", "summary": "Burn in after a fault.", "trigger": {"alerts": [{"alertname": "A"}]},
           "steps": [{"id": "out", "kind": "quarantine", "reason": "why"},
                     {"id": "burn", "kind": "burnin", "tests": ["gemm", "nvlink-bw"]}]}


def test_a_runbook_listing_an_unknown_burnin_test_is_refused_when_it_loads(tmp_path):
    path = tmp_path / "rb.yaml"
    path.write_text(yaml.safe_dump(RUNBOOK))
    with pytest.raises(RunbookError) as err:
        load_runbook(path)
    message = str(err.value)
    assert message.startswith(f"{path}: steps[1].tests[1]: ") and "'nvlink-bw'" in message


def test_a_custom_schema_without_the_list_still_cannot_let_an_unknown_test_through(tmp_path, monkeypatch):
    """A runbook directory that brings its own (older) schema is checked against the suite too."""
    schema = json.loads(schema_path().read_text())
    schema["$defs"]["burnin"]["properties"]["tests"]["items"] = {"type": "string"}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    monkeypatch.setenv("AIDC_RUNBOOKS", str(tmp_path))
    with pytest.raises(RunbookError) as err:
        parse_runbook(copy.deepcopy(RUNBOOK), "rb.yaml")
    assert str(err.value) == ("rb.yaml: steps[1].tests: unknown burn-in test(s) 'nvlink-bw' (the burn-in tests are:"
                              f" {', '.join(ALL)})")
    ok = copy.deepcopy(RUNBOOK)
    ok["steps"][1]["tests"] = ["gemm", "storage"]
    assert parse_runbook(ok, "rb.yaml").steps[1].raw["tests"] == ["gemm", "storage"]


def _node(name, tests, metrics, **kw) -> NodeResult:
    return NodeResult(node=name, gpu_model="SIM", spare=False, metrics=metrics, tests=list(tests),
                      gpus=[{"index": 0}], **kw)


def test_only_the_tests_a_node_ran_are_judged_and_the_rest_are_noted():
    memcpy_only = _node("a", ["memcpy"], {"memcpy_gbps": 10.0})
    judge({"a": memcpy_only}, {"a": {"gemm_fp32_tflops": 5.0}}, 0.25, 0.1, baselines={"SIM": {"memcpy_gbps": 9.0}})
    assert memcpy_only.passed, memcpy_only.reasons
    assert "not run (not among the tests asked for): gemm, storage, dcgm, allreduce, collectives, train" in \
        memcpy_only.notes
    # The same figures claimed by a full run: what it should have measured and did not fails it.
    full = _node("b", ALL, {"memcpy_gbps": 10.0})
    judge({"b": full}, {}, 0.25, 0.1)
    assert not full.passed
    assert {"gemm_fp32_tflops was not measured", "the DDP training run did not report",
            "GPU 0: the known-answer checks did not run"} <= set(full.reasons)
    # Within a selection, a slow figure still fails against the stored baseline.
    slow = _node("c", ["memcpy"], {"memcpy_gbps": 5.0})
    judge({"c": slow}, {}, 0.25, 0.1, baselines={"SIM": {"memcpy_gbps": 9.0}})
    assert not slow.passed and slow.reasons[0].startswith("memcpy_gbps 5 GB/s is 44% below the SIM baseline")


@pytest.mark.slow
def test_the_lab_launcher_runs_only_the_listed_tests_and_the_certificate_names_them(tmp_path):
    """The node program itself skips what is not asked for: no GEMM, no collective, no training."""
    from aidc.audit.log import AuditLog
    from aidc.burnin.launch import launcher_for
    from tests.burnin.test_lab_burnin import small_spec

    spec = small_spec(nodes=2)
    with AuditLog(tmp_path / "audit.db") as audit:
        result = launcher_for("lab").run(spec, spec.nodes()[:1], lab_dir=tmp_path, audit=audit, progress=False,
                                         timeout_s=120, say=lambda _: None, tests=["memcpy"])
        (cert,) = audit.records(kind="burnin.certificate")
    (node,) = result.report.nodes.values()
    assert node.passed, node.reasons
    assert set(node.metrics) == {"memcpy_gbps"} and node.collectives == {} and node.training == {}
    assert [sorted(g) for g in node.gpus] == [["device", "index", "memcpy"]]
    assert cert.node == "n-0" and cert.payload["tests"] == ["memcpy"] and cert.payload["verdict"] == "pass"
