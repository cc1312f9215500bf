"""Typed runbook parameters: what a value from an alert or a person must look like before any step
sees it, the catalog rules that make every used variable declared, and the engine refusing a run
whose values do not fit."""

from __future__ import annotations

import json
import os.path
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aidc.runbook.catalog import RunbookError, parse_runbook
from aidc.runbook.params import (
    MALFORMED,
    MISSING,
    NOT_A_CHOICE,
    NOT_UNDER,
    OUT_OF_RANGE,
    PARAM_TYPES,
    TOO_LONG,
    VALUE_TYPES,
    WRONG_TYPE,
    ParamError,
    check_value,
    validate,
)
from runbook_fakes import alert

ROOT = Path(__file__).resolve().parents[2]

SPECS = {
    "int": {"type": "int", "min": 0, "max": 15},
    "enum": {"type": "enum", "values": ["soft", "hard"]},
    "netdev": {"type": "netdev"},
    "rdma_device": {"type": "rdma_device"},
    "node": {"type": "node"},
    "pci_bus_id": {"type": "pci_bus_id"},
    "path": {"type": "path", "under": ["/data/checkpoints", "/var/lib/aidc/checkpoints"]},
}
# Characters that let a value become code or options somewhere downstream: templates, shells,
# argument splitting, PromQL label matchers, path traversal.
DANGEROUS = ["{{", "{%", " ", "\t", "\n", ";", "|", "&", "$", "`", "'", '"', "\\", "*", "\x00"]


def test_the_schema_lists_exactly_the_types_the_validator_knows():
    schema = json.loads((ROOT / "runbooks" / "schema.json").read_text())
    assert sorted(schema["$defs"]["param"]["properties"]["type"]["enum"]) == sorted(PARAM_TYPES)
    assert sorted(VALUE_TYPES) == sorted(PARAM_TYPES) == sorted(SPECS)


@pytest.mark.parametrize("kind, good, expected", [
    ("int", "3", 3), ("int", 15, 15), ("int", "0", 0),
    ("enum", "hard", "hard"),
    ("netdev", "ib0", "ib0"), ("netdev", "enp1s0f1.100", "enp1s0f1.100"),
    ("rdma_device", "mlx5_0", "mlx5_0"),
    ("node", "gpu-0", "gpu-0"), ("node", "gpu-0.rack1.example", "gpu-0.rack1.example"),
    ("pci_bus_id", "0000:18:00.0", "0000:18:00.0"), ("pci_bus_id", "0000:AB:1F.7", "0000:ab:1f.7"),
    ("path", "/data/checkpoints", "/data/checkpoints"), ("path", "/data/checkpoints/run-7", "/data/checkpoints/run-7"),
])
def test_values_of_the_declared_type_are_accepted_and_typed(kind, good, expected):
    assert check_value("v", SPECS[kind], good) == expected


@pytest.mark.parametrize("kind, bad", [
    ("int", "0 --other-flag"), ("int", "16"), ("int", "-1"), ("int", "3.0"), ("int", True), ("int", " 3"),
    ("int", "0 {{ lookup('pipe', 'id') }}"),
    ("enum", "soft "), ("enum", "SOFT"),
    ("netdev", "-ib0"), ("netdev", "ib0 down"), ("netdev", "a" * 16), ("netdev", ".."), ("netdev", "ib/0"),
    ("rdma_device", "mlx5_0 --x"), ("rdma_device", "0mlx"),
    ("node", "gpu-0;id"), ("node", "-gpu"), ("node", "gpu_0"),
    ("pci_bus_id", "18:00.0"), ("pci_bus_id", "0000:18:00.8"),
    ("path", "/data/checkpoints/../../etc"), ("path", "/data/checkpoints-other"), ("path", "data/checkpoints"),
    ("path", "/data/checkpoints/"), ("path", "/data/checkpoints//x"), ("path", "/data/checkpoints/-rf"),
    ("path", "/etc"), ("path", "/data/checkpoints/{{ x }}"),
])
def test_values_that_do_not_fit_are_refused_with_the_name(kind, bad):
    with pytest.raises(ParamError, match="^v: "):
        check_value("v", SPECS[kind], bad)


# Why check_value can refuse a value of a known type.
REFUSAL_KINDS = {WRONG_TYPE, TOO_LONG, MALFORMED, OUT_OF_RANGE, NOT_A_CHOICE, NOT_UNDER}

ANY_VALUE = st.one_of(st.text(max_size=40), st.text(alphabet=string.printable, max_size=300), st.integers(),
                      st.booleans(), st.none(), st.floats(), st.binary(max_size=8),
                      st.lists(st.integers(), max_size=2), st.sampled_from(DANGEROUS))


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(SPECS)), value=ANY_VALUE)
def test_any_input_is_either_a_value_of_the_declared_type_or_a_param_error(kind, value):
    spec = SPECS[kind]
    try:
        out = check_value("v", spec, value)
    except ParamError as exc:
        assert [p.name for p in exc.problems] == ["v"] and exc.problems[0].kind in REFUSAL_KINDS
        return
    assert type(out) is VALUE_TYPES[kind]
    if kind == "int":
        assert spec["min"] <= out <= spec["max"]
        return
    assert not any(d in out for d in DANGEROUS), out
    assert not out.startswith("-")
    if kind == "enum":
        assert out in spec["values"]
    if kind == "netdev":
        assert 1 <= len(out) <= 15
    if kind == "path":
        assert os.path.normpath(out) == out and ".." not in out.split("/")
        assert any(out == r or out.startswith(r + "/") for r in spec["under"])
    # An accepted value is a fixed point: checking it again gives it back.
    assert check_value("v", spec, out) == out


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-10**6, 10**6))
def test_an_integer_is_accepted_exactly_when_it_is_in_range(n):
    spec = SPECS["int"]
    for given_as in (n, str(n)):
        if spec["min"] <= n <= spec["max"]:
            assert check_value("gpu", spec, given_as) == n
        else:
            with pytest.raises(ParamError) as err:
                check_value("gpu", spec, given_as)
            assert [(p.name, p.kind) for p in err.value.problems] == [("gpu", OUT_OF_RANGE)]


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}", fullmatch=True), max_size=4))
def test_a_normalized_path_under_an_allowed_root_is_accepted(parts):
    parts = [p for p in parts if p not in (".", "..")]
    path = "/".join(["/data/checkpoints", *parts])
    assert check_value("path", SPECS["path"], path) == path


def test_validate_keeps_declared_values_only_and_names_every_problem():
    params = {"gpu": SPECS["int"], "xid": {"type": "int", "min": 1, "max": 1023, "required": False},
              "path": {**SPECS["path"], "source": "annotation", "key": "volume"}}
    values = validate(params, {"alertname": "AidcX", "gpu": "3", "extra": "{{ x }}"}, {"volume": "/data/checkpoints"})
    assert values == {"alertname": "AidcX", "gpu": 3, "path": "/data/checkpoints"}
    with pytest.raises(ParamError) as err:
        validate(params, {"alertname": "Aidc X", "gpu": "99"}, {})
    assert [(p.name, p.kind) for p in err.value.problems] == [
        ("alertname", MALFORMED), ("gpu", OUT_OF_RANGE), ("path", MISSING)]
    assert "alertname" in str(err.value) and "gpu: 99 is outside" in str(err.value)
    assert "path: required, and the trigger has no 'volume' annotation" in str(err.value)
    assert validate(params, {}, {}, allow_missing=True) == {}
    with pytest.raises(ParamError, match="not a node of this cluster"):
        validate({"peer": {"type": "node"}}, {"peer": "gpu-9"}, nodes=["gpu-0"])


# --- catalog rules ---------------------------------------------------------------------------

def _doc(steps, params=None):
    doc = {"name": "gen", "title": "Generated", "summary": "A runbook built by a test.",
           "trigger": {"alerts": [{"alertname": "Gen"}]}, "steps": steps}
    if params is not None:
        doc["params"] = params
    return doc


GPU = {"type": "int", "min": 0, "max": 15, "description": "the GPU"}


@pytest.mark.parametrize("steps, params, message", [
    ([{"id": "t", "kind": "notify", "message": "GPU ${gpu}"}], {}, r"steps\[0\].message: \$\{gpu\} is neither"),
    ([{"id": "t", "kind": "notify", "message": "GPU $gpu"}], None, r"\$\{gpu\} is neither"),
    ([{"id": "p", "kind": "playbook", "playbook": "gpu-reset.yml", "extravars": {"gpu": "-i ${gpu}"}}],
     {"gpu": GPU}, "one whole"),
    ([{"id": "p", "kind": "playbook", "playbook": "gpu-reset.yml", "extravars": {"gpu": "${gpu}"}}],
     {"gpu": {**GPU, "required": False}}, "optional"),
    ([{"id": "t", "kind": "notify", "message": "hello"}], {"gpu": {**GPU, "min": 9, "max": 2}}, "min 9 is above max 2"),
    ([{"id": "t", "kind": "notify", "message": "hello"}], {"node": GPU}, "params"),
    ([{"id": "t", "kind": "notify", "message": "hello"}], {"gpu": {"type": "int", "description": "no range"}}, "min"),
    ([{"id": "t", "kind": "notify", "message": "hello"}], {"p": {"type": "path", "description": "no root"}}, "under"),
])
def test_a_runbook_using_an_undeclared_or_unfit_variable_does_not_load(steps, params, message):
    with pytest.raises(RunbookError, match=message):
        parse_runbook(_doc(steps, params))


def test_a_declared_param_reaches_a_playbook_typed():
    from aidc.runbook.steps import step_params

    rb = parse_runbook(_doc([{"id": "p", "kind": "playbook", "playbook": "gpu-reset.yml",
                              "extravars": {"gpu": "${gpu}", "all_gpus": False}}], {"gpu": GPU}))
    assert step_params(rb.steps[0], {"gpu": 3})["extravars"] == {"gpu": 3, "all_gpus": False}


# --- the engine ------------------------------------------------------------------------------

WITH_GPU = """
name: reset-one
title: Reset one GPU
summary: Quarantine, reset the alert's GPU after approval.
trigger:
  alerts: [{alertname: GpuBroken}]
params:
  gpu: {type: int, min: 0, max: 7, description: The GPU the alert names.}
steps:
  - {id: out, kind: quarantine, reason: "GPU ${gpu} broken"}
  - {id: ok, kind: approve, prompt: "Reset GPU ${gpu} on ${node}?"}
  - {id: reset, kind: playbook, playbook: gpu-reset.yml, extravars: {gpu: "${gpu}"}}
on_failure:
  - {id: hand-over, kind: notify, message: "reset-one failed on ${node}"}
"""


def _drive(engine, run_id):
    for _ in range(4):
        run = engine.execute(run_id)
        if run.status != "awaiting_approval":
            return run
        engine.approve(run_id, "alice")
    raise AssertionError("still waiting")


def _fresh_engine(directory: Path):
    from aidc.audit.log import AuditLog
    from aidc.runbook.actuators import Actuators
    from aidc.runbook.catalog import Catalog
    from aidc.runbook.engine import Engine
    from aidc.runbook.state import RunState
    from runbook_fakes import NODES, FakeBurnin, FakeMetrics, FakeNotifier, FakePlaybooks, FakeScheduler, write_runbook

    (directory / "rb").mkdir()
    write_runbook(directory / "rb", WITH_GPU)
    actuators = Actuators(scheduler=FakeScheduler(), metrics=FakeMetrics(), playbooks=FakePlaybooks(),
                          burnin=FakeBurnin(), notifier=FakeNotifier())
    return Engine(catalog=Catalog.load(directory / "rb"), state=RunState(directory / "state.db"),
                  audit=AuditLog(directory / "audit.db"), actuators=actuators, nodes=list(NODES))


@settings(max_examples=25, deadline=None)
@given(gpu=st.one_of(st.text(max_size=20), st.integers(-5, 20).map(str), st.sampled_from(
    ["0 --other-flag", "{{ lookup('pipe', 'id') }}", "0; reboot", " 1", "1 "])))
def test_a_run_gets_the_playbook_a_typed_gpu_or_fails_before_any_step(gpu):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aidc-params-") as tmp:
        engine = _fresh_engine(Path(tmp))
        try:
            sub = engine.submit_alert(alert("GpuBroken", "gpu-1", gpu=gpu))
            assert sub.outcome == "started"
            run = _drive(engine, sub.run_id)
            fits = gpu.isascii() and gpu.isdigit() and 0 <= int(gpu) <= 7
            if fits:
                assert run.status == "done"
                assert engine.actuators.playbooks.calls == [("gpu-reset.yml", "gpu-1", {"gpu": int(gpu)})]
            else:
                assert run.status == "failed"
                assert run.error.startswith("trigger values do not fit the runbook's params: ")
                assert engine.actuators.playbooks.calls == [] and engine.actuators.scheduler.calls == []
                assert engine.actuators.notifier.messages == []  # on_failure steps do not run either
                assert all(s.status == "pending" for s in engine.state.steps(sub.run_id))
                [rejected] = engine.audit.records(kind="runbook.params.rejected")
                assert rejected.payload["run_id"] == sub.run_id and rejected.payload["trigger"]["labels"]["gpu"] == gpu
                assert [p["name"] for p in rejected.payload["problems"]] == ["gpu"]
        finally:
            engine.audit.close()
            engine.state.close()


def test_labels_a_runbook_does_not_declare_never_reach_a_step(make_engine):
    engine = make_engine(WITH_GPU)
    sub = engine.submit_alert(alert("GpuBroken", "gpu-1", gpu="2", playbook="{{ evil }}", run_id="{{ evil }}"))
    _drive(engine, sub.run_id)
    inputs = [r.payload["inputs"] for r in engine.audit.records(kind="runbook.step") if "inputs" in r.payload]
    assert all("evil" not in json.dumps(i) for i in inputs)
    assert engine.actuators.scheduler.calls == [("quarantine", "gpu-1")]
    assert engine.actuators.playbooks.calls == [("gpu-reset.yml", "gpu-1", {"gpu": 2})]


def test_a_dry_run_refuses_a_value_that_does_not_fit_and_shows_a_missing_one(make_engine):
    engine = make_engine(WITH_GPU)
    with pytest.raises(ParamError, match="gpu: '0 --x' is not an integer"):
        engine.plan("reset-one", "gpu-1", {"source": "cli", "labels": {"gpu": "0 --x"}})
    plan = engine.plan("reset-one", "gpu-1", {"source": "cli", "labels": {}})
    assert "<gpu?>" in plan[1].would


def test_every_alert_rule_carries_the_labels_its_runbook_requires():
    """A required param the alert cannot carry would fail every run of that alert."""
    import re

    import yaml

    from aidc.runbook.catalog import Catalog

    catalog = Catalog.load(ROOT / "runbooks")
    rules = [r for g in yaml.safe_load((ROOT / "runbooks" / "alerts" / "aidc-alerts.yml").read_text())["groups"]
             for r in g["rules"] if "alert" in r]
    checked = 0
    for rule in rules:
        rb = catalog.get(rule["annotations"]["runbook"])
        required = {name: spec for name, spec in rb.params.items()
                    if spec.get("required", True) and spec.get("source", "label") == "label"}
        if not required:  # e.g. the fleet-wide breaker alert: its runbook takes nothing from labels
            continue
        groupings = [{x.strip() for x in m.split(",")} for m in re.findall(r"\bby \(([^)]*)\)", rule["expr"])]
        assert groupings, f"{rule['alert']}: no `by (...)`: which labels it carries is unclear"
        for name, spec in required.items():
            key = spec.get("key", name)
            assert all(key in g for g in groupings), f"{rule['alert']} does not always carry {key!r} ({rb.name})"
            checked += 1
    assert checked >= 6
