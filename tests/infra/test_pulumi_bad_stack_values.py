"""Bad stack values stop the Pulumi program with a message that names the key, before any resource."""

from __future__ import annotations

import json

import pulumi
import pytest
import yaml
from pulumi_harness import ROOT
from pulumi_harness import run_program


def _cluster():
    return yaml.safe_load((ROOT / "Pulumi.h100-example.yaml").read_text())["config"]["aidc:cluster"]


def _run_with(tmp_path, cluster):
    path = tmp_path / "Pulumi.bad.yaml"
    path.write_text(yaml.safe_dump({"config": {"aidc:cluster": cluster}}))
    return run_program(path)


@pytest.mark.parametrize("change, key, expected", [
    (lambda c: c["node_pools"][0].update(count=-4), "aidc:cluster.node_pools[0].count", "greater than or equal to 1"),
    (lambda c: c["node_pools"][0].update(spares=-1), "aidc:cluster.node_pools[0].spares", "greater than or equal to 0"),
    (lambda c: c["node_pools"][0].update(gpu_model="H900"), "aidc:cluster.node_pools[0].gpu_model", "one of"),
    (lambda c: c["kms"].update(rotation_days=0), "aidc:cluster.kms.rotation_days", "greater than or equal to 1"),
    (lambda c: c["node_pools"][0].update(provisioner="terraform"), "aidc:cluster.node_pools[0].provisioner",
     "karpenter"),
    (lambda c: c["fabric"].update(rails=4), "aidc:cluster.fabric", "hcas lists 8 devices but rails is 4"),
    (lambda c: c["fabric"].update(ipam_cidr="10.224.0.0/40"), "aidc:cluster.fabric.ipam_cidr", "IPv4 network"),
    (lambda c: c["software"].update(kubernetes_version="one-thirty"), "aidc:cluster.software.kubernetes_version",
     "pattern"),
    # Strict types: the program gets no coerced values either.
    (lambda c: c["node_pools"][0].update(count=True), "aidc:cluster.node_pools[0].count", "an integer, not true"),
    (lambda c: c["policy"].update(dry_run="yes"), "aidc:cluster.policy.dry_run", "true or false, not the string"),
    (lambda c: c["fabric"].update(link_speed_gbps=10 ** 6), "aidc:cluster.fabric.link_speed_gbps",
     "less than or equal to 3200"),
])
def test_bad_value_fails_the_program_naming_the_key(tmp_path, change, key, expected):
    cluster = _cluster()
    change(cluster)
    with pytest.raises(pulumi.RunError) as err:
        _run_with(tmp_path, cluster)
    message = str(err.value)
    assert f"{key}:" in message and expected in message
    assert "Traceback" not in message


def test_rail_subnets_too_small_for_the_fleet_name_ipam_cidr(tmp_path):
    cluster = _cluster()
    cluster["fabric"]["ipam_cidr"] = "10.224.0.0/22"  # 8 rails of /25: 126 addresses < 68 nodes x 8
    with pytest.raises(pulumi.RunError) as err:
        _run_with(tmp_path, cluster)
    assert "aidc:cluster.fabric.ipam_cidr" in str(err.value) and "68 nodes x 8" in str(err.value)


def test_cluster_api_pools_need_a_patch_kubernetes_version(tmp_path):
    cluster = _cluster()
    cluster["node_pools"][0]["provisioner"] = "cluster-api"
    with pytest.raises(pulumi.RunError) as err:
        _run_with(tmp_path, cluster)
    assert "software.kubernetes_version with a patch release" in str(err.value)


def test_missing_cluster_config_is_reported_by_pulumi_config(tmp_path):
    path = tmp_path / "Pulumi.empty.yaml"
    path.write_text("config: {}\n")
    with pytest.raises(pulumi.ConfigMissingError) as err:
        run_program(path, config={})
    assert "aidc:cluster" in str(err.value)


def test_spec_in_stack_config_is_parsed_from_its_json_form(tmp_path):
    cluster = _cluster()
    build = run_program(tmp_path / "Pulumi.json.yaml", config={"aidc:cluster": json.dumps(cluster)})
    assert build.exports["gpu_nodes"] == 68
