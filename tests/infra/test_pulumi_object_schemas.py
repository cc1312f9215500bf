"""Every object the program creates is valid for its API: built-ins against the targeted Kubernetes
version (strict), custom resources against the pinned operators' schemas, Helm values against the
pinned charts."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml
from pulumi_harness import ROOT, build_of
from pulumi_schema_check import (
    builtin_errors, custom_resource_errors, custom_schemas, unknown_value_keys, values_file,
)

from aidc.spec import load_stack

STACKS = ["Pulumi.h100-example.yaml", "Pulumi.lab.yaml", "tests/infra/stacks/Pulumi.capi-roce.yaml"]
RELEASE = "kubernetes:helm.sh/v3:Release"


_verdicts: dict[str, list[tuple[dict, list[str] | None]]] = {}


def _builtin_verdicts(stack):
    """(object, kubernetes-validate errors or None for a custom resource), once per stack."""
    if stack not in _verdicts:
        version = load_stack(ROOT / stack).software.kubernetes_minor
        objects = [r.k8s_object for r in build_of(ROOT / stack).resources if r.custom and r.type != RELEASE]
        _verdicts[stack] = [(o, builtin_errors(o, version)) for o in objects]
    return _verdicts[stack]


@pytest.mark.parametrize("stack", STACKS)
def test_every_builtin_object_is_valid_for_the_targeted_kubernetes_version_strictly(stack):
    version = load_stack(ROOT / stack).software.kubernetes_minor
    assert any(v.startswith(version) for v in kubernetes_validate.utils.all_versions())
    builtins = [(o, errors) for o, errors in _builtin_verdicts(stack) if errors is not None]
    assert {"DaemonSet", "ClusterRole", "StorageClass", "PersistentVolumeClaim", "Secret"} <= \
        {o["kind"] for o, _ in builtins}
    for obj, errors in builtins:
        assert errors == [], f"{obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("stack", STACKS)
def test_every_custom_resource_matches_the_pinned_operator_schema(stack):
    customs = [o for o, errors in _builtin_verdicts(stack) if errors is None]
    assert "ServiceMonitor" in {o["kind"] for o in customs}
    for obj in customs:  # none is left unchecked: a kind without a pinned schema fails here
        assert custom_resource_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_the_field_checks_reject_a_misspelt_field():
    good = build_of(ROOT / STACKS[0]).of_type("kubernetes:karpenter.sh/v1:NodePool")[0].k8s_object
    bad = json.loads(json.dumps(good))
    bad["spec"]["template"]["spec"]["taint"] = bad["spec"]["template"]["spec"].pop("taints")
    assert any("taint" in e for e in custom_resource_errors(bad))
    ds = json.loads(json.dumps(build_of(ROOT / STACKS[0]).of_type("kubernetes:apps/v1:DaemonSet")[0].k8s_object))
    ds["spec"]["template"]["spec"]["toleration"] = ds["spec"]["template"]["spec"].pop("tolerations")
    assert builtin_errors(ds, "1.33")


def test_custom_resource_schemas_come_from_the_pinned_releases():
    spec = load_stack("h100-example")
    sources = {kind: doc["source"] for (_, kind), doc in custom_schemas().items()}
    assert f"v{spec.software.network_operator_chart}" in sources["NicClusterPolicy"]
    assert f"v{spec.software.network_operator_chart}" in sources["IPPool"]
    assert "v1.14.1" in sources["NodePool"] and "v1.14.1" in sources["EC2NodeClass"]
    assert "v1.14.0" in sources["MachineDeployment"]


@pytest.mark.parametrize("stack", STACKS)
def test_helm_values_use_only_keys_of_the_pinned_chart_version(stack):
    build = build_of(ROOT / stack)
    for release in build.of_type(RELEASE):
        chart, version = release.inputs["chart"], release.inputs["version"]
        assert values_file(chart, version)["version"] == version
        assert unknown_value_keys(release.inputs["values"], chart, version) == []


def test_values_check_rejects_a_key_the_chart_does_not_have():
    assert unknown_value_keys({"driver": {"upgradePolicy": {"maxParallelUpgrade": 1}}}, "gpu-operator",
                              "v26.7.0") == ["driver.upgradePolicy.maxParallelUpgrade"]


@pytest.mark.parametrize("stack", STACKS)
def test_encryption_configuration_is_a_valid_kms_v2_configuration(stack):
    build = build_of(ROOT / stack)
    (secret,) = [r for r in build.of_type("kubernetes:core/v1:Secret")
                 if r.inputs["metadata"]["name"] == "aidc-encryption-config"]
    doc = yaml.safe_load(secret.inputs["stringData"]["encryption-configuration.yaml"])
    assert custom_resource_errors(doc) == []
    assert doc == yaml.safe_load(build.exports["encryption_configuration"])


def test_rail_networks_reference_their_pool_interface_and_rdma_resource(h100):
    nic = h100.one("kubernetes:mellanox.com/v1alpha1:NicClusterPolicy").inputs["spec"]
    resources = {c["resourceName"]: c["selectors"]["ifNames"]
                 for c in json.loads(nic["rdmaSharedDevicePlugin"]["config"])["configList"]}
    pools = {p.inputs["metadata"]["name"] for p in h100.of_type("kubernetes:nv-ipam.nvidia.com/v1alpha1:IPPool")}
    for net in h100.of_type("kubernetes:k8s.cni.cncf.io/v1:NetworkAttachmentDefinition"):
        cni = json.loads(net.inputs["spec"]["config"])
        rail = int(cni["name"].removeprefix("rail-"))
        assert cni["ipam"] == {"type": "nv-ipam", "poolName": cni["name"]} and cni["name"] in pools
        assert cni["master"] == f"ib{rail}"
        resource = net.inputs["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"].removeprefix("rdma/")
        assert resources[resource] == [cni["master"]]


def test_every_pinned_schema_is_exercised_by_a_shipped_or_test_stack():
    validated = {o["kind"] for stack in STACKS for o, errors in _builtin_verdicts(stack) if errors is None}
    # EncryptionConfiguration is checked above; PrometheusRule where the alert file is given
    # (test_pulumi_program_graph), as the shipped stacks may run without it.
    assert {kind for _, kind in custom_schemas()} - validated <= {"EncryptionConfiguration", "PrometheusRule"}
    assert {"NodePool", "EC2NodeClass", "MachineDeployment", "KubeadmConfigTemplate", "NicClusterPolicy", "IPPool",
            "NetworkAttachmentDefinition", "ServiceMonitor", "Cluster"} <= validated
