"""The Pulumi program, run under mocks per stack file: which resources, how many, under which parent."""

from __future__ import annotations

import json

import pytest
import yaml
from pulumi_harness import ROOT, build_of

from aidc.spec import load_stack

NODEPOOLS = "aidc:nodepools:GpuNodePools"
GPU = "aidc:gpu:GpuPlatform"
FABRIC = "aidc:fabric:Fabric"
STORAGE = "aidc:storage:Storage"
KMS = "aidc:kms:KmsEncryption"
AGENT = "aidc:agent:NodeAgent"
RELEASE = "kubernetes:helm.sh/v3:Release"
CAPI_STACK = ROOT / "tests/infra/stacks/Pulumi.capi-roce.yaml"


def _parent_of(build, type_):
    parents = {r.parent_type for r in build.of_type(type_)}
    assert len(parents) == 1, parents
    return parents.pop()


def test_every_shipped_stack_file_builds_under_mocks(stack_files):
    names = [p.name for p in stack_files]
    assert "Pulumi.lab.yaml" in names and "Pulumi.h100-example.yaml" in names
    for path in stack_files:
        build = build_of(path)
        assert build.exports["cluster"] == load_stack(path).name
        assert build.of_type(AGENT), f"{path.name}: no agent"


def test_h100_example_creates_both_operator_releases_with_pinned_charts(h100):
    releases = {r.inputs["chart"]: r for r in h100.of_type(RELEASE)}
    assert set(releases) == {"gpu-operator", "network-operator"}
    assert releases["gpu-operator"].inputs["version"] == "v26.7.0"
    assert releases["network-operator"].inputs["version"] == "26.4.1"
    assert releases["gpu-operator"].parent_type == GPU
    assert releases["network-operator"].parent_type == FABRIC
    assert all(r.inputs["repositoryOpts"]["repo"] == "https://helm.ngc.nvidia.com/nvidia" for r in releases.values())


def test_h100_example_has_a_nic_cluster_policy_and_eight_rail_networks(h100):
    assert h100.one("kubernetes:mellanox.com/v1alpha1:NicClusterPolicy").parent_type == FABRIC
    pools = h100.of_type("kubernetes:nv-ipam.nvidia.com/v1alpha1:IPPool")
    nets = h100.of_type("kubernetes:k8s.cni.cncf.io/v1:NetworkAttachmentDefinition")
    assert sorted(p.inputs["metadata"]["name"] for p in pools) == [f"rail-{i}" for i in range(8)]
    assert sorted(n.inputs["metadata"]["name"] for n in nets) == [f"rail-{i}" for i in range(8)]
    assert {_parent_of(h100, p.type) for p in pools + nets} == {FABRIC}


def test_h100_example_storage_classes_and_claims(h100):
    classes = {c.inputs["metadata"]["name"]: c for c in h100.of_type("kubernetes:storage.k8s.io/v1:StorageClass")}
    assert set(classes) == {"aidc-datasets", "aidc-checkpoints", "aidc-local-nvme"}
    claims = {c.inputs["metadata"]["name"]: c for c in h100.of_type("kubernetes:core/v1:PersistentVolumeClaim")}
    assert set(claims) == {"datasets", "checkpoints"}
    assert _parent_of(h100, "kubernetes:storage.k8s.io/v1:StorageClass") == STORAGE
    assert _parent_of(h100, "kubernetes:core/v1:PersistentVolumeClaim") == STORAGE


def test_h100_example_encryption_configuration_and_key_reference(h100):
    secret = h100.one("kubernetes:core/v1:Secret")
    assert secret.parent_type == KMS and secret.inputs["metadata"]["namespace"] == "kube-system"
    config = yaml.safe_load(secret.inputs["stringData"]["encryption-configuration.yaml"])
    assert config["kind"] == "EncryptionConfiguration"
    assert config["resources"][0]["providers"][0]["kms"]["apiVersion"] == "v2"
    refs = [c for c in h100.of_type("kubernetes:core/v1:ConfigMap") if c.parent_type == KMS]
    assert [r.inputs["data"]["key_id"] for r in refs] == [load_stack("h100-example").kms.key_id]


def test_h100_example_agent_daemonset_with_its_rbac_service_and_monitor(h100):
    for kind in ("apps/v1:DaemonSet", "rbac.authorization.k8s.io/v1:ClusterRole",
                 "rbac.authorization.k8s.io/v1:ClusterRoleBinding", "core/v1:ServiceAccount", "core/v1:Service",
                 "monitoring.coreos.com/v1:ServiceMonitor"):
        assert [r.parent_type for r in h100.of_type(f"kubernetes:{kind}")].count(AGENT) == 1, kind


def test_prometheus_rule_exists_exactly_when_the_agent_alert_file_exists(h100):
    rules = h100.of_type("kubernetes:monitoring.coreos.com/v1:PrometheusRule")
    assert len(rules) == (1 if (ROOT / "runbooks/alerts/aidc-alerts.yml").exists() else 0)


def test_h100_example_node_pools_with_a_spare_pool_under_karpenter(h100):
    pools = {p.inputs["metadata"]["name"]: p for p in h100.of_type("kubernetes:karpenter.sh/v1:NodePool")}
    assert set(pools) == {"h100-example-h100", "h100-example-h100-spare"}
    assert pools["h100-example-h100"].inputs["spec"]["replicas"] == 64
    assert pools["h100-example-h100-spare"].inputs["spec"]["replicas"] == 4
    classes = h100.of_type("kubernetes:karpenter.k8s.aws/v1:EC2NodeClass")
    assert {c.inputs["metadata"]["name"] for c in classes} == set(pools)
    for p in pools.values():
        assert p.inputs["spec"]["template"]["spec"]["nodeClassRef"]["name"] == p.inputs["metadata"]["name"]
    assert _parent_of(h100, "kubernetes:karpenter.sh/v1:NodePool") == NODEPOOLS
    assert not h100.of_type("kubernetes:cluster.x-k8s.io/v1beta2:MachineDeployment")


def test_components_are_children_of_the_stack_and_every_resource_has_a_component_parent(h100):
    components = [r for r in h100.resources if not r.custom]
    assert {c.parent_type for c in components} == {"pulumi:pulumi:Stack"}
    assert all(r.parent_type.startswith("aidc:") for r in h100.resources if r.custom)


def test_lab_stack_has_no_gpu_operator_fabric_or_provisioning(lab):
    kinds = lab.kinds()
    assert RELEASE not in kinds and FABRIC not in kinds
    assert not [t for t in kinds if "karpenter" in t or "cluster.x-k8s.io" in t]
    assert lab.exports["node_pools"] == [] and lab.exports["rails"] == []
    # The simulated lab has no NVIDIA runtime: the agent must not ask for one.
    pod = lab.one("kubernetes:apps/v1:DaemonSet").inputs["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod


def test_cluster_api_stack_gets_machine_deployments_and_static_pools_get_nothing():
    build = build_of(CAPI_STACK)
    deployments = {d.inputs["metadata"]["name"]: d for d in
                   build.of_type("kubernetes:cluster.x-k8s.io/v1beta2:MachineDeployment")}
    assert set(deployments) == {"capi-roce-b200", "capi-roce-b200-spare"}  # the static l40s pool: none
    assert deployments["capi-roce-b200"].inputs["spec"]["replicas"] == 16
    assert deployments["capi-roce-b200-spare"].inputs["spec"]["replicas"] == 2
    templates = build.of_type("kubernetes:bootstrap.cluster.x-k8s.io/v1beta2:KubeadmConfigTemplate")
    assert {t.inputs["metadata"]["name"] for t in templates} == set(deployments)
    assert not build.of_type("kubernetes:karpenter.sh/v1:NodePool")
    assert len(build.of_type("kubernetes:nv-ipam.nvidia.com/v1alpha1:IPPool")) == 4


def test_roce_rails_attach_with_macvlan_and_infiniband_rails_with_ipoib(h100):
    roce = build_of(CAPI_STACK).of_type("kubernetes:k8s.cni.cncf.io/v1:NetworkAttachmentDefinition")
    ib = h100.of_type("kubernetes:k8s.cni.cncf.io/v1:NetworkAttachmentDefinition")
    assert {json.loads(n.inputs["spec"]["config"])["type"] for n in roce} == {"macvlan"}
    assert {json.loads(n.inputs["spec"]["config"])["type"] for n in ib} == {"ipoib"}
    nic = build_of(CAPI_STACK).one("kubernetes:mellanox.com/v1alpha1:NicClusterPolicy").inputs["spec"]
    assert "ipoib" not in nic["secondaryNetwork"]


@pytest.mark.parametrize("stack", ["Pulumi.h100-example.yaml", "Pulumi.lab.yaml"])
def test_agent_reads_the_same_spec_that_pulumi_deployed(stack):
    build = build_of(ROOT / stack)
    spec = load_stack(ROOT / stack)
    config = [c for c in build.of_type("kubernetes:core/v1:ConfigMap") if c.parent_type == AGENT][0]
    (doc,) = config.inputs["data"].values()
    assert yaml.safe_load(doc)["config"]["aidc:cluster"] == spec.model_dump(mode="json")


def test_agent_alert_rule_file_becomes_a_prometheus_rule_valid_for_the_pinned_operator(tmp_path):
    from pulumi_harness import run_under_mocks
    from pulumi_schema_check import custom_resource_errors

    from aidc_infra.program import ALERT_RULES, build

    rules = tmp_path / ALERT_RULES
    rules.parent.mkdir(parents=True)
    rules.write_text(yaml.safe_dump({"groups": [{"name": "aidc-node", "rules": [
        {"alert": "AidcFatalXid", "expr": "increase(aidc_xid_total{action!=\"ignore\"}[5m]) > 0", "for": "0s",
         "labels": {"severity": "critical"}, "annotations": {"runbook": "xid-fatal"}}]}]}))
    spec = load_stack("h100-example")
    result = run_under_mocks("alerts", {}, lambda: build(spec, tmp_path))
    rule = result.one("kubernetes:monitoring.coreos.com/v1:PrometheusRule")
    assert rule.parent_type == AGENT
    assert rule.inputs["spec"]["groups"][0]["rules"][0]["alert"] == "AidcFatalXid"
    assert custom_resource_errors(rule.k8s_object) == []
