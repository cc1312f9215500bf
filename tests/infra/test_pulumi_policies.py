"""The policy pack: each mandatory rule with a passing and a violating resource, then the whole
pack over the shipped stacks (passes on the H100 example, fails at 365-day rotation)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import yaml
from pulumi_harness import ROOT, build_of

import aidc_policies as rules
from aidc_policies import POLICIES, violations

NODEPOOL = "kubernetes:karpenter.sh/v1:NodePool"
MACHINES = "kubernetes:cluster.x-k8s.io/v1beta2:MachineDeployment"
GPU_TAINT = {"key": "nvidia.com/gpu", "effect": "NoSchedule"}


def _pool(taints):
    return {"spec": {"template": {"metadata": {"labels": {"aidc.dev/gpu-model": "H100"}},
                                  "spec": {"taints": taints}}}}


def _kms(days):
    return {"metadata": {"labels": {"aidc.dev/kms": "key-reference"}}, "data": {"rotation_days": str(days)}}


def _daemonset(privileged, name="aidc-agent", container="agent"):
    return {"metadata": {"name": name, "namespace": "aidc-system"},
            "spec": {"template": {"spec": {"containers": [
                {"name": container, "securityContext": {"privileged": privileged}}]}}}}


def test_kms_rotation_of_90_days_passes_and_365_days_is_a_violation_naming_the_key():
    cm = "kubernetes:core/v1:ConfigMap"
    assert rules.kms_rotation_at_most_90_days(cm, _kms(90), "kms") == []
    (msg,) = rules.kms_rotation_at_most_90_days(cm, _kms(365), "kms")
    assert "365 days" in msg and "aidc:cluster.kms.rotation_days" in msg
    assert rules.kms_rotation_at_most_90_days(cm, {"metadata": {}, "data": {"rotation_days": "365"}}, "x") == []


@pytest.mark.parametrize("type_", [NODEPOOL, MACHINES])
def test_gpu_pool_with_the_gpu_taint_passes_and_without_it_is_a_violation(type_):
    assert rules.gpu_pools_tainted(type_, _pool([GPU_TAINT]), "p") == []
    assert "nvidia.com/gpu:NoSchedule" in rules.gpu_pools_tainted(type_, _pool([]), "p")[0]
    wrong_effect = [{"key": "nvidia.com/gpu", "effect": "PreferNoSchedule"}]
    assert rules.gpu_pools_tainted(type_, _pool(wrong_effect), "p")


def test_checkpoint_class_with_retain_passes_and_delete_or_default_is_a_violation():
    sc = "kubernetes:storage.k8s.io/v1:StorageClass"
    labels = {"metadata": {"labels": {"aidc.dev/volume": "checkpoints"}}}
    assert rules.checkpoint_storage_retained(sc, {**labels, "reclaimPolicy": "Retain"}, "c") == []
    assert "Delete" in rules.checkpoint_storage_retained(sc, {**labels, "reclaimPolicy": "Delete"}, "c")[0]
    assert rules.checkpoint_storage_retained(sc, labels, "c")  # Kubernetes defaults to Delete


def test_rbac_with_explicit_rules_passes_and_any_wildcard_is_a_violation():
    role = "kubernetes:rbac.authorization.k8s.io/v1:ClusterRole"
    good = {"rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]}
    assert rules.rbac_without_wildcards(role, good, "r") == []
    for field in ("verbs", "resources", "apiGroups"):
        bad = copy.deepcopy(good)
        bad["rules"][0][field] = ["*"]
        (msg,) = rules.rbac_without_wildcards(role, bad, "r")
        assert field in msg


def test_privileged_container_passes_only_when_on_the_allow_list():
    ds = "kubernetes:apps/v1:DaemonSet"
    assert rules.no_privileged_containers(ds, _daemonset(True), "agent") == []
    assert rules.no_privileged_containers(ds, _daemonset(False, name="other"), "other") == []
    (msg,) = rules.no_privileged_containers(ds, _daemonset(True, name="other"), "other")
    assert "aidc-system/DaemonSet/other/agent" in msg
    assert rules.no_privileged_containers(ds, _daemonset(True), "agent", allowlist={})


def test_allow_list_file_gives_a_reason_for_every_entry():
    allow = rules.load_allowlist()
    assert allow and all(isinstance(v, str) and len(v) > 20 for v in allow.values())


def _triples(build):
    return [(r.type, r.inputs, r.name) for r in build.resources if r.custom]


def test_policy_pack_passes_on_the_h100_example_and_the_lab(h100, lab):
    assert violations(_triples(h100)) == {}
    assert violations(_triples(lab)) == {}


def test_policy_pack_fails_on_a_stack_with_365_day_rotation(tmp_path):
    doc = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())
    doc["config"]["aidc:cluster"]["kms"]["rotation_days"] = 365
    path = tmp_path / "Pulumi.rotation-365.yaml"
    path.write_text(yaml.safe_dump(doc))
    found = violations(_triples(build_of(path)))
    assert list(found) == ["kms-rotation-at-most-90-days"]
    assert "365 days" in found["kms-rotation-at-most-90-days"][0]


def test_pack_wraps_every_rule_as_a_mandatory_pulumi_policy_that_reports_through_the_sdk(h100):
    from pulumi_policy import EnforcementLevel, ResourceValidationArgs

    spec = importlib.util.spec_from_file_location("aidc_policy_pack", ROOT / "policy" / "__main__.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)  # defines the policies; serving happens only under `pulumi`
    policies = {p.name: p for p in pack.policies()}
    assert set(policies) == set(POLICIES)
    assert {p.enforcement_level for p in policies.values()} == {EnforcementLevel.MANDATORY}
    kms = [r for r in h100.of_type("kubernetes:core/v1:ConfigMap") if r.inputs["metadata"]["name"] == "aidc-kms"][0]
    reported = []
    bad = copy.deepcopy(kms.inputs)
    bad["data"]["rotation_days"] = "365"
    for props, expect in ((kms.inputs, 0), (bad, 1)):
        args = ResourceValidationArgs(kms.type, props, f"urn:{kms.name}", kms.name, None, None)
        before = len(reported)
        policies["kms-rotation-at-most-90-days"].validate(args, lambda m, urn=None: reported.append(m))
        assert len(reported) - before == expect

