"""The cluster spec: one typed model read from Pulumi.<stack>.yaml."""

import json

import pytest
import yaml

from aidc.errors import SpecError
from aidc.spec import load_stack, parse_spec


def test_lab_stack_is_four_nodes_of_two_simulated_gpus_plus_one_spare():
    spec = load_stack("lab")
    nodes = spec.nodes()
    assert [n.name for n in nodes if not n.spare] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
    assert [n.name for n in nodes if n.spare] == ["gpu-spare-0"]
    assert all(n.gpus == 2 and n.gpu_model == "SIM" for n in nodes)
    assert spec.device_backend == "sim" and spec.scheduler == "lab"


def _write_stack(tmp_path, cluster):
    path = tmp_path / "Pulumi.bad.yaml"
    path.write_text(yaml.safe_dump({"config": {"aidc:cluster": cluster}}))
    return path


def _minimal(**pool):
    return {"name": "t", "node_pools": [{"name": "gpu", "count": 2, "gpu_model": "H100", "gpus_per_node": 8, **pool}]}


@pytest.mark.parametrize(
    "change, key, expected",
    [
        ({"count": -1}, "aidc:cluster.node_pools[0].count", "greater than or equal to 1"),
        ({"gpu_model": "H900"}, "aidc:cluster.node_pools[0].gpu_model", "one of"),
        ({"gpus_per_node": "eight"}, "aidc:cluster.node_pools[0].gpus_per_node", "integer"),
        ({"colour": "red"}, "aidc:cluster.node_pools[0].colour", "unknown key"),
    ],
)
def test_bad_values_name_the_file_the_key_path_and_what_was_expected(tmp_path, change, key, expected):
    path = _write_stack(tmp_path, _minimal(**change))
    with pytest.raises(SpecError) as err:
        load_stack(path)
    assert err.value.file == str(path)
    assert err.value.key == key
    assert expected in err.value.expected


def test_kms_rotation_zero_is_rejected_with_its_key():
    with pytest.raises(SpecError) as err:
        parse_spec({**_minimal(), "kms": {"rotation_days": 0}})
    assert err.value.key == "aidc:cluster.kms.rotation_days"


def test_roce_fabric_needs_a_gid_index():
    with pytest.raises(SpecError) as err:
        parse_spec({**_minimal(), "fabric": {"kind": "roce", "rails": 2}})
    assert "gid_index" in err.value.expected


def test_max_unavailable_accepts_nodes_or_a_percentage():
    spec = parse_spec({**_minimal(), "policy": {"max_unavailable": "25%"}})
    assert spec.policy.max_unavailable_nodes(64) == 16
    assert parse_spec({**_minimal(), "policy": {"max_unavailable": 3}}).policy.max_unavailable_nodes(64) == 3


def test_missing_stack_lists_the_known_ones(tmp_path):
    with pytest.raises(SpecError) as err:
        load_stack("does-not-exist")
    assert "lab" in err.value.expected


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text("config:\n  aidc:cluster: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_stack(path)
    assert "valid YAML" in err.value.expected


def test_cli_spec_show_json_and_bad_stack_without_traceback(aidc_cli, tmp_path):
    out = aidc_cli("spec", "show", "--stack", "lab", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["nodes"]) == 5
    bad = _write_stack(tmp_path, _minimal(count=-3))
    out = aidc_cli("spec", "show", "--stack", str(bad))
    assert out.returncode == 2
    assert "aidc:cluster.node_pools[0].count" in out.stderr
    assert "Traceback" not in out.stderr


def test_provisioning_fields_have_defaults_so_older_stack_files_still_load():
    spec = parse_spec(_minimal())
    assert spec.node_pools[0].provisioner == "static"
    assert spec.fabric.rail_ifnames == [] and spec.fabric.ipam_cidr == "10.224.0.0/12"
    assert spec.software.driver_source == "host" and spec.software.kubernetes_minor == "1.31"
    assert spec.agent.command == ["aidc", "agent", "run"] and spec.agent.image


def test_rail_interface_list_must_match_the_rail_count():
    with pytest.raises(SpecError) as err:
        parse_spec({**_minimal(), "fabric": {"kind": "infiniband", "rails": 2, "rail_ifnames": ["ib0"]}})
    assert "rail_ifnames lists 1" in err.value.expected


def test_cluster_api_pools_need_a_kubernetes_patch_release():
    cluster = {**_minimal(provisioner="cluster-api"), "software": {"kubernetes_version": "1.33"}}
    with pytest.raises(SpecError) as err:
        parse_spec(cluster)
    assert "software.kubernetes_version" in err.value.expected
    cluster["software"]["kubernetes_version"] = "1.33.4"
    assert parse_spec(cluster).software.kubernetes_minor == "1.33"
