"""Values the components derive from the spec: budgets, rails, volumes, agent settings."""

from __future__ import annotations

import pytest
import yaml
from pulumi_harness import ROOT

from aidc.errors import AidcError, SpecError
from aidc.spec import load_stack, parse_spec
from aidc_infra.agent import load_alert_rules, needs_privilege, pod_spec, scrape_interval
from aidc_infra.fabric import rail_plan
from aidc_infra.gpu_platform import driver_upgrade_policy, gpu_operator_values
from aidc_infra.kms import encryption_configuration, key_reference
from aidc_infra.nodepools import capi_rollout, karpenter_nodepool, pool_plans
from aidc_infra.storage import volume_plans


def _spec(**changes):
    cluster = yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())["config"]["aidc:cluster"]
    for path, value in changes.items():
        node = cluster
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return parse_spec(cluster)


@pytest.mark.parametrize("max_unavailable, parallel, auto", [("5%", 3, True), (2, 2, True), ("1%", 1, False),
                                                             (0, 1, False)])
def test_driver_upgrade_parallelism_follows_max_unavailable_and_zero_turns_upgrades_off(max_unavailable, parallel,
                                                                                           auto):
    policy = driver_upgrade_policy(_spec(policy__max_unavailable=max_unavailable))
    # 68 GPU nodes: 5% -> 3; 1% -> 0 nodes, which must not become the operator's "0 = unlimited"
    assert (policy["maxParallelUpgrades"], policy["autoUpgrade"]) == (parallel, auto)
    assert policy["maxUnavailable"] == str(max_unavailable)


def test_gpu_operator_leaves_host_drivers_alone_and_installs_the_branch_when_asked():
    assert gpu_operator_values(_spec())["driver"]["enabled"] is False
    values = gpu_operator_values(_spec(software__driver_source="operator", software__driver_branch="575"))
    assert values["driver"]["enabled"] and values["driver"]["version"] == "575"
    assert values["dcgmExporter"]["serviceMonitor"]["enabled"] and values["migManager"]["enabled"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in values["daemonsets"]["tolerations"]


def test_rails_get_equal_disjoint_subnets_sized_for_one_address_per_gpu():
    rails = rail_plan(_spec())
    assert [r.ifname for r in rails] == [f"ib{i}" for i in range(8)]
    assert [r.hca for r in rails] == [f"mlx5_{i}" for i in range(8)]
    assert {r.subnet.split("/")[1] for r in rails} == {"15"} and len({r.subnet for r in rails}) == 8
    assert {r.per_node_block for r in rails} == {8}


def test_rail_names_default_by_fabric_kind():
    assert [r.ifname for r in rail_plan(_spec(fabric__rail_ifnames=[]))][:2] == ["ib0", "ib1"]
    roce = _spec(fabric__kind="roce", fabric__gid_index=3, fabric__rail_ifnames=[], fabric__hcas=[])
    assert [r.ifname for r in rail_plan(roce)][:2] == ["rail0", "rail1"]


def test_a_fabric_too_small_for_the_fleet_names_ipam_cidr():
    with pytest.raises(SpecError) as err:
        rail_plan(_spec(fabric__ipam_cidr="10.0.0.0/24"))
    assert err.value.key == "aidc:cluster.fabric.ipam_cidr"


def test_karpenter_pool_holds_count_nodes_and_the_spare_pool_holds_spares_with_a_spare_taint():
    spec = _spec()
    workers, spares = pool_plans(spec)
    w, s = karpenter_nodepool(spec, workers, "nc"), karpenter_nodepool(spec, spares, "nc")
    assert (w["replicas"], s["replicas"]) == (64, 4)
    assert w["template"]["spec"]["taints"] == [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    assert {"key": "aidc.dev/spare", "value": "true", "effect": "NoSchedule"} in s["template"]["spec"]["taints"]
    labels = s["template"]["metadata"]["labels"]
    assert labels["aidc.dev/spare"] == "true" and labels["aidc.dev/rails"] == "8"
    assert labels["aidc.dev/gpu-model"] == "H100" and labels["aidc.dev/tenant"] == "research"
    assert w["disruption"]["budgets"] == [{"nodes": "5%"}]
    assert {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["p5.48xlarge"]} in \
        w["template"]["spec"]["requirements"]


def test_pools_without_spares_get_no_spare_pool_and_static_pools_get_nothing():
    assert [p.name for p in pool_plans(_spec(node_pools=[{**_spec().node_pools[0].model_dump(), "spares": 0}]))] == \
        ["h100-example-h100"]
    assert pool_plans(load_stack("lab")) == []


def test_cluster_api_rolls_within_max_unavailable_without_surge_and_not_at_all_at_zero():
    assert capi_rollout(_spec(policy__max_unavailable=2))["strategy"]["rollingUpdate"] == \
        {"maxSurge": 0, "maxUnavailable": 2}
    assert capi_rollout(_spec(policy__max_unavailable=0)) == {"strategy": {"type": "OnDelete"}}


def test_volumes_shared_filesystems_are_read_write_many_and_checkpoints_retain():
    datasets, checkpoints = volume_plans(_spec())
    assert (datasets.access_mode, datasets.reclaim, datasets.provisioner) == ("ReadWriteMany", "Delete",
                                                                              "fsx.csi.aws.com")
    assert (checkpoints.access_mode, checkpoints.reclaim) == ("ReadWriteMany", "Retain")
    assert checkpoints.parameters["perUnitStorageThroughput"] == "1000"
    local = volume_plans(load_stack("lab"))[1]
    assert (local.access_mode, local.binding_mode, local.reclaim) == ("ReadWriteOnce", "WaitForFirstConsumer",
                                                                      "Retain")


def test_volume_provisioner_override_wins_over_the_catalog():
    spec = _spec(storage__checkpoints__provisioner="lustre.csi.example.com")
    assert volume_plans(spec)[1].provisioner == "lustre.csi.example.com"


def test_encryption_configuration_names_the_provider_and_the_key_reference_carries_rotation():
    doc = encryption_configuration(_spec())
    kms = doc["resources"][0]["providers"][0]["kms"]
    assert kms["name"] == "aidc-aws-kms" and kms["endpoint"] == "unix:///var/run/kmsplugin/aws-kms.sock"
    assert doc["resources"][0]["providers"][-1] == {"identity": {}}
    ref = key_reference(_spec(kms__rotation_days=30))
    assert ref["rotation_days"] == "30" and ref["key_id"].startswith("arn:aws:kms:")


def test_key_reference_says_where_a_pkcs11_key_lives_and_carries_no_pin():
    spec = _spec(kms__provider="pkcs11", kms__pkcs11={"token_label": "aidc", "pin_file": "/etc/aidc/pin"})
    ref = key_reference(spec)
    assert ref["pkcs11_token_label"] == "aidc" and ref["pkcs11_pin_file"] == "/etc/aidc/pin"
    assert ref["pkcs11_pin_env"] == "AIDC_PKCS11_PIN" and "pin" not in ref
    assert all(isinstance(v, str) for v in ref.values())  # ConfigMap data


@pytest.mark.parametrize("kms", [
    {"provider": "local", "keyring": "/srv/keyring"},
    {"provider": "pkcs11", "pkcs11": {"token_label": "aidc", "pin_file": "/etc/aidc/pin"}},
    {"provider": "aws-kms", "key_id": "arn:aws:kms:eu-west-1:111122223333:key/1a2b",
     "aws": {"region": "eu-west-1", "signing_key_id": "alias/aidc-signing"}},
])
def test_the_key_reference_reads_back_as_the_specs_kms_settings(kms):
    """What trainers read from the mounted aidc-kms ConfigMap (aidc.kms.open_from_reference) is
    the stack's kms section, whole: nothing the provider needs is left out of the reference."""
    from aidc.kms import kms_from_reference

    spec = _spec(kms=kms)
    assert kms_from_reference(key_reference(spec)) == spec.kms


def test_agent_runs_privileged_only_to_read_a_kernel_log_device():
    assert needs_privilege(_spec()) is True
    plain = _spec(agent__kernel_log="/var/log/kern.log")
    container = pod_spec(plain)["containers"][0]
    assert needs_privilege(plain) is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mount = [m for m in container["volumeMounts"] if m["name"] == "kernel-log"][0]
    assert mount == {"name": "kernel-log", "mountPath": "/var/log/kern.log", "readOnly": True}


def test_agent_uses_nvml_through_the_nvidia_runtime_and_tolerates_gpu_spare_and_noexecute_taints():
    pod = pod_spec(_spec())
    assert pod["runtimeClassName"] == "nvidia"
    keys = {(t.get("key"), t["effect"]) for t in pod["tolerations"]}
    assert keys == {("nvidia.com/gpu", "NoSchedule"), ("aidc.dev/spare", "NoSchedule"), (None, "NoExecute")}
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AIDC_STACK"]["value"] == "h100-example" and env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert pod["containers"][0]["ports"] == [{"name": "metrics", "containerPort": 9402, "protocol": "TCP"}]


def test_scrape_interval_is_never_below_15_seconds_nor_below_the_poll_interval():
    assert scrape_interval(_spec()) == "15s"
    assert scrape_interval(_spec(agent__poll_interval_s=42.5)) == "43s"


def test_alert_rule_file_becomes_a_prometheus_rule_spec_and_bad_files_say_what_was_expected(tmp_path):
    assert load_alert_rules(tmp_path / "absent.yml") is None
    good = tmp_path / "rules.yml"
    good.write_text("groups:\n- name: aidc\n  rules:\n  - alert: GpuFellOffTheBus\n    expr: up == 0\n"
                    "    for: 1m\n    labels: {severity: critical}\n")
    assert load_alert_rules(good)["groups"][0]["rules"][0]["alert"] == "GpuFellOffTheBus"
    bad = tmp_path / "bad.yml"
    bad.write_text("rules: []\n")
    with pytest.raises(AidcError, match="non-empty 'groups' list"):
        load_alert_rules(bad)
