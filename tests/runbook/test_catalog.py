"""Runbooks are data: every shipped runbook validates against the schema, and bad ones are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aidc.runbook.catalog import Catalog, RunbookError, expand, load_runbook, parse_runbook
from aidc.spec import Policy

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "runbooks").glob("*.yaml"))
REQUIRED = ["gpu-fallen-off-bus", "ecc-row-remap", "nvlink-errors", "infiniband-link", "busbw-regression",
            "thermal-throttling", "straggler-node", "checkpoint-disk-full", "node-not-back-after-reboot"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_runbook_validates_against_the_schema(path):
    rb = load_runbook(path)
    assert rb.name == path.stem and rb.steps


def test_the_issue_s_nine_runbooks_are_shipped():
    assert set(REQUIRED) <= set(Catalog.load(ROOT / "runbooks").names())


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_destructive_step_outside_default_policy_follows_an_approve_step(path):
    rb = load_runbook(path)
    auto = set(Policy().runbook_auto_approve)
    approved = False
    for step in rb.steps:
        approved |= step.kind == "approve"
        if step.destructive and step.kind not in auto:
            assert approved, f"{rb.name}: step {step.id} ({step.kind}) runs without an approval"


def test_a_straggler_alert_takes_the_node_out_only_after_a_human_approves_as_the_straggler_policy_says():
    # policy.stragglers.action defaults to alert: a slow node still trains, so the runbook behind
    # the straggler alert asks before it quarantines (failover quarantines where the policy says so).
    assert Policy().stragglers.action == "alert"
    kinds = [step.kind for step in load_runbook(ROOT / "runbooks/straggler-node.yaml").steps]
    assert "approve" in kinds and kinds.index("approve") < kinds.index("quarantine")


def test_every_runbook_is_named_by_an_alert_rule_and_every_alert_names_a_runbook():
    rules = yaml.safe_load((ROOT / "runbooks/alerts/aidc-alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    catalog = Catalog.load(ROOT / "runbooks")
    for name, rule in alerts.items():
        rb = catalog.get(rule["annotations"]["runbook"])
        assert rb.matches_alert({"alertname": name, **rule.get("labels", {})}), f"{rb.name} ignores {name}"
    for name in catalog.names():
        for trig in catalog.get(name).trigger.get("alerts", []):
            assert trig["alertname"] in alerts, f"{name} waits for an alert no rule raises: {trig['alertname']}"


BASE = {"name": "x-ray", "title": "Test", "summary": "A test runbook for the schema.",
        "trigger": {"alerts": [{"alertname": "A"}]}, "steps": [{"id": "s1", "kind": "notify", "message": "hello"}]}


@pytest.mark.parametrize("mutate, where, what", [
    (lambda d: d["steps"][0].pop("message"), "steps[0]", "message"),
    (lambda d: d["steps"][0].update(kind="reboot"), "steps[0]", ""),
    (lambda d: d["steps"].append({"id": "q", "kind": "quarantine"}), "steps[1]", "reason"),
    (lambda d: d["steps"].append({"id": "c", "kind": "check", "source": "prometheus", "expect": "> 0"}),
     "steps[1]", "query"),
    (lambda d: d["steps"].append({"id": "w", "kind": "wait", "seconds": 1, "colour": "red"}), "steps[1]", "colour"),
    (lambda d: d.update(trigger={}), "trigger", ""),
    (lambda d: d.update(timeout_s=-1), "timeout_s", ""),
    (lambda d: d.update(guards=[{"guard": "node_state"}]), "guards[0]", "is"),
])
def test_a_bad_runbook_is_refused_naming_the_key(mutate, where, what):
    import copy

    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(RunbookError) as err:
        parse_runbook(doc, "bad.yaml")
    assert str(err.value).startswith(f"bad.yaml: {where}")
    assert what in str(err.value)


def test_repeated_step_ids_are_refused():
    doc = {**BASE, "steps": [BASE["steps"][0], dict(BASE["steps"][0])]}
    with pytest.raises(RunbookError, match="unique.*s1"):
        parse_runbook(doc, "dup.yaml")


def test_a_runbook_file_must_be_named_after_its_runbook(tmp_path):
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(BASE))
    with pytest.raises(RunbookError, match="expected 'other'"):
        load_runbook(tmp_path / "other.yaml")


def test_invalid_yaml_is_an_error_with_the_line(tmp_path):
    (tmp_path / "x-ray.yaml").write_text("name: x-ray\nsteps: [\n")
    with pytest.raises(RunbookError, match="line"):
        load_runbook(tmp_path / "x-ray.yaml")


def test_alerts_match_by_alertname_before_fault_class():
    catalog = Catalog.load(ROOT / "runbooks")
    assert catalog.match({"alertname": "AidcGpuFallenOffBus", "Hostname": "n"}).name == "gpu-fallen-off-bus"
    assert catalog.match({"alertname": "SomethingElse", "kind": "nvlink_down"}).name == "nvlink-errors"
    assert catalog.match({"alertname": "SomethingElse"}) is None


def test_unknown_runbook_names_the_known_ones():
    with pytest.raises(RunbookError, match="known: .*gpu-fallen-off-bus"):
        Catalog.load(ROOT / "runbooks").get("no-such")


def test_variables_fill_text_and_leave_promql_selectors_alone():
    assert expand('up{Hostname="${node}"}', {"node": "gpu-1"}) == 'up{Hostname="gpu-1"}'
    assert expand({"a": ["GPU ${gpu}"]}, {}) == {"a": ["GPU <gpu?>"]}
