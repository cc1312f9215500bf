"""The cluster spec's runbook policy field (policy.runbook_auto_approve)."""

from __future__ import annotations

import pytest

from aidc.errors import SpecError
from aidc.spec import load_stack, parse_spec

BASE = {"name": "t", "node_pools": [{"name": "gpu", "count": 2, "gpu_model": "SIM", "gpus_per_node": 2}]}


def test_by_default_only_quarantine_runs_without_a_human():
    assert load_stack("lab").policy.runbook_auto_approve == ["quarantine"]


def test_an_operator_can_allow_more_destructive_kinds():
    spec = parse_spec({**BASE, "policy": {"runbook_auto_approve": ["quarantine", "release"]}})
    assert spec.policy.runbook_auto_approve == ["quarantine", "release"]


def test_an_unknown_step_kind_in_the_policy_is_an_error_naming_the_key():
    with pytest.raises(SpecError, match=r"aidc:cluster\.policy\.runbook_auto_approve\[0\]"):
        parse_spec({**BASE, "policy": {"runbook_auto_approve": ["reboot"]}}, "Pulumi.t.yaml")
