"""`aidc inventory`: the spec as an Ansible dynamic inventory (groups per pool, host vars from the spec)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aidc.errors import SpecError
from aidc.inventory import inventory_host, inventory_list, pool_group
from aidc.spec import load_stack, parse_spec
from ansible_sandbox import H100_STACK, ROOT, inventory_script


def test_h100_inventory_has_one_group_per_pool_a_spares_group_and_host_vars_from_the_spec():
    spec = load_stack(H100_STACK)
    inv = inventory_list(spec)
    assert inv["all"]["children"] == ["pool_h100", "spares", "aidc_controllers"]
    assert inv["aidc_controllers"] == {"hosts": []}  # the fixture names no controller host
    assert len(inv["pool_h100"]["hosts"]) == 64 + 2
    assert inv["spares"]["hosts"] == ["h100-spare-0", "h100-spare-1"]
    assert inv["_meta"]["hostvars"]["h100-63"] == {
        "aidc_node_name": "h100-63", "aidc_pool": "h100", "aidc_spare": False, "aidc_gpu_model": "H100",
        "aidc_gpus": 8, "aidc_gpu_simulated": False, "aidc_gpu_vendor": "nvidia", "aidc_gpu_nvlink": True}
    cluster = inv["all"]["vars"]
    assert cluster["aidc_scheduler"] == "slurm"
    assert cluster["aidc_slurm"] == spec.slurm.model_dump(mode="json")  # health-check settings for slurm_node
    assert cluster["aidc_fabric"]["hcas"] == [f"mlx5_{i}" for i in range(8)]
    assert cluster["aidc_fabric"]["link_speed_gbps"] == 400
    assert parse_spec(cluster["aidc_cluster_spec"]) == spec  # the whole spec round-trips


def test_pool_names_with_dashes_become_underscored_group_names():
    spec = parse_spec({"name": "x", "node_pools": [
        {"name": "h100-a", "count": 1, "gpu_model": "H100", "gpus_per_node": 8},
        {"name": "l40s", "count": 2, "gpu_model": "L40S", "gpus_per_node": 4}]})
    inv = inventory_list(spec)
    assert pool_group("h100-a") == "pool_h100_a"
    assert inv["pool_h100_a"]["hosts"] == ["h100-a-0"]
    assert inv["pool_l40s"]["hosts"] == ["l40s-0", "l40s-1"]
    assert inventory_host(spec, "l40s-1")["aidc_gpus"] == 4


def _addressed_spec(**controller):
    return parse_spec({"name": "x", "scheduler": "slurm", "node_pools": [
        {"name": "gpu", "count": 2, "spares": 1, "gpu_model": "SIM", "gpus_per_node": 2,
         "addresses": ["10.0.0.11", "10.0.0.12", "10.0.0.19"]}], "controller": controller})


def test_listed_addresses_become_ansible_host_and_the_management_address_in_node_order():
    inv = inventory_list(_addressed_spec())
    hostvars = inv["_meta"]["hostvars"]
    assert {n: (v["ansible_host"], v["aidc_management_address"]) for n, v in hostvars.items()} == {
        "gpu-0": ("10.0.0.11", "10.0.0.11"), "gpu-1": ("10.0.0.12", "10.0.0.12"),
        "gpu-spare-0": ("10.0.0.19", "10.0.0.19")}
    assert inv["all"]["vars"]["aidc_agent_controller_url"] == ""  # no controller: events stay on the node
    # Without addresses the inventory names none (Ansible resolves the node's name).
    assert "ansible_host" not in inventory_list(load_stack(H100_STACK))["_meta"]["hostvars"]["h100-0"]


def test_controller_hosts_form_their_own_group_and_the_agents_default_controller_url():
    spec = _addressed_spec(hosts=[{"name": "ctl-0", "address": "10.0.0.2"}], events_port=9555)
    inv = inventory_list(spec)
    assert inv["aidc_controllers"] == {"hosts": ["ctl-0"]}
    assert "aidc_controllers" in inv["all"]["children"]
    assert inv["_meta"]["hostvars"]["ctl-0"] == {"aidc_controller_name": "ctl-0", "ansible_host": "10.0.0.2",
                                                 "aidc_management_address": "10.0.0.2"}
    assert inventory_host(spec, "ctl-0")["aidc_controller_name"] == "ctl-0"
    assert inv["all"]["vars"]["aidc_agent_controller_url"] == "https://10.0.0.2:9555"
    v6 = parse_spec({**spec.model_dump(mode="json"), "controller": {"hosts": [{"name": "c", "address": "fd00::2"}]}})
    assert v6.agent_controller_url() == "https://[fd00::2]:9443"


@pytest.mark.parametrize(("change", "expected"), [
    ({"addresses": ["10.0.0.11"]}, "addresses lists 1 but the pool has 3 nodes"),
    ({"addresses": ["10.0.0.11", "gpu-host", "10.0.0.19"]}, "an IP address such as 10.0.0.11, not 'gpu-host'"),
    ({"addresses": ["10.0.0.11", "10.0.0.11", "10.0.0.19"]}, "10.0.0.11 is given to both gpu-0 and gpu-1"),
])
def test_pool_addresses_are_one_ip_per_node_and_unique(change, expected):
    pool = {"name": "gpu", "count": 2, "spares": 1, "gpu_model": "SIM", "gpus_per_node": 2, **change}
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "x", "node_pools": [pool]})
    assert expected in str(err.value)


@pytest.mark.parametrize(("section", "expected"), [
    ({"controller": {"hosts": [{"name": "gpu-0", "address": "10.0.0.2"}]}}, "controller host 'gpu-0' is also a node"),
    ({"controller": {"hosts": [{"name": "c", "address": "10.0.0.12"}]}}, "10.0.0.12 is given to both gpu-1 and c"),
    ({"controller": {"events_port": 9097}}, "events_port, metrics_port and runbook_port must differ"),
    ({"agent": {"controller_url": "http://10.0.0.2:9443"}}, "https://HOST:PORT"),
    ({"agent": {"controller_url": "https://10.0.0.2"}}, "https://HOST:PORT"),
    ({"agent": {"listen_address": "gpu-0.example"}}, "an IP address"),
    ({"agent": {"metrics_tls": "yes"}}, "'off', 'tls' or 'mutual'"),
])
def test_agent_and_controller_settings_are_validated_with_their_key(section, expected):
    data = _addressed_spec().model_dump(mode="json")
    for key, value in section.items():
        data[key] = {**data[key], **value}
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert expected in str(err.value)


def test_unknown_host_is_a_spec_error_naming_known_nodes():
    with pytest.raises(SpecError, match="gpu-0, gpu-1"):
        inventory_host(load_stack(ROOT / "Pulumi.lab.yaml"), "nope")


def test_cli_list_and_host_follow_the_dynamic_inventory_protocol(aidc_cli):
    listed = aidc_cli("inventory", "--stack", str(H100_STACK), "--list")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == inventory_list(load_stack(H100_STACK))
    host = aidc_cli("inventory", "--stack", str(H100_STACK), "--host", "h100-spare-1")
    assert host.returncode == 0, host.stderr
    assert json.loads(host.stdout)["aidc_spare"] is True


def test_cli_host_not_in_the_cluster_answers_an_empty_object_as_the_protocol_says(aidc_cli):
    for name in ("nope", ""):  # "" must not fall back to the whole --list document
        out = aidc_cli("inventory", "--stack", "lab", "--host", name)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {}


def test_cli_reports_bad_input_without_a_traceback(aidc_cli):
    missing = aidc_cli("inventory", "--stack", "no-such-stack", "--list")
    assert missing.returncode == 2 and "known stacks here" in missing.stderr and "Traceback" not in missing.stderr


def test_ansible_reads_the_inventory_script_and_merges_group_and_host_vars(tmp_path):
    script = inventory_script(tmp_path, ROOT / "Pulumi.lab.yaml")
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah"), "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(script),
                           "--host", "gpu-spare-0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    hostvars = json.loads(proc.stdout)
    assert hostvars["aidc_spare"] is True and hostvars["aidc_gpus"] == 2
    assert hostvars["aidc_scheduler"] == "lab" and hostvars["aidc_fabric"]["kind"] == "netns"


def test_shipped_inventory_script_passes_its_arguments_to_aidc(tmp_path):
    env = {**os.environ, "AIDC": f"{sys.executable} -m aidc", "AIDC_STACK": str(H100_STACK)}
    proc = subprocess.run([str(ROOT / "playbooks" / "inventory" / "aidc_spec.sh"), "--host", "h100-0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["aidc_node_name"] == "h100-0"


def test_every_gpu_model_names_its_vendor_for_slurm_gres_detection():
    from aidc.spec import gpu_models

    vendors = {name: model.get("vendor") for name, model in gpu_models().items()}
    assert all(isinstance(v, str) and v for v in vendors.values()), vendors
    assert vendors["SIM"] == "simulated" and vendors["H100"] == "nvidia"
