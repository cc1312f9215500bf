"""Bad input reaches the user as one `aidc: error:` line naming the file or key, never a traceback."""

from __future__ import annotations

import json

import pytest

from aidc.errors import DeviceError, SpecError
from aidc.device import sim
from aidc.spec import load_stack, parse_spec

LAB = {"name": "x", "node_pools": [{"name": "gpu", "count": 2, "gpu_model": "SIM", "gpus_per_node": 2}]}


def _stack(tmp_path, body: str | bytes, name: str = "Pulumi.t.yaml"):
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return path


def _one_error_line(proc, *needles: str) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aidc: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _spec(**extra) -> dict:
    return {**LAB, **extra}


# a. reading the stack file
def test_stack_file_that_is_a_directory_is_a_spec_error(tmp_path, aidc_cli):
    (tmp_path / "Pulumi.d.yaml").mkdir()
    with pytest.raises(SpecError, match="readable stack file"):
        load_stack(tmp_path / "Pulumi.d.yaml")
    _one_error_line(aidc_cli("spec", "show", "--stack", str(tmp_path / "Pulumi.d.yaml")), "Pulumi.d.yaml")


def test_stack_file_not_utf8_is_a_spec_error(tmp_path, aidc_cli):
    path = _stack(tmp_path, b"config:\n  aidc:cluster:\n    name: caf\xe9\n")
    _one_error_line(aidc_cli("spec", "show", "--stack", str(path)), str(path), "UTF-8")


def test_stack_name_too_long_is_a_spec_error(aidc_cli):
    _one_error_line(aidc_cli("spec", "show", "--stack", "x" * 300), "File name too long")


# b. device show
def test_device_show_sim_without_node_dir_and_a_bad_timeout_are_usage_errors(aidc_cli):
    proc = aidc_cli("device", "show", "--backend", "sim")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--node-dir" in proc.stderr
    proc = aidc_cli("device", "show", "--timeout", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--timeout" in proc.stderr


# c. audit --db that is not an audit database
def test_audit_db_that_is_junk_or_a_directory_is_an_audit_error(tmp_path, aidc_cli):
    junk = tmp_path / "junk.db"
    junk.write_text("this is not sqlite at all, just some text\n" * 4)
    _one_error_line(aidc_cli("audit", "verify", "--db", str(junk)), str(junk), "not an audit database")
    (tmp_path / "dir.db").mkdir()
    _one_error_line(aidc_cli("audit", "show", "--db", str(tmp_path / "dir.db")), "dir.db", "not an audit database")


# d. corrupt simulated node state
def test_corrupt_sim_state_is_a_device_error_naming_the_file(tmp_path, aidc_cli):
    node = tmp_path / "n0"
    node.mkdir()
    (node / sim.STATE_FILE).write_text("{bad")
    with pytest.raises(DeviceError, match="device.json"):
        sim.SimBackend(node)
    with pytest.raises(DeviceError, match="device.json"):
        sim.inject(node, "xid", 0)
    _one_error_line(aidc_cli("device", "show", "--backend", "sim", "--node-dir", str(node)), "device.json")


# e. NaN / infinity
@pytest.mark.parametrize("data, key", [
    (_spec(fabric={"link_speed_gbps": float("inf")}), "fabric.link_speed_gbps"),
    (_spec(policy={"burnin": {"floors": {"gemm_tflops": float("nan")}}}), "floors.gemm_tflops"),
])
def test_non_finite_numbers_are_rejected(data, key):
    with pytest.raises(SpecError, match="finite") as err:
        parse_spec(data)
    assert key in err.value.key


def test_json_output_refuses_nan():
    from aidc.cli.output import emit
    from aidc.errors import AidcError

    with pytest.raises(AidcError, match="JSON"):
        emit({"x": float("nan")}, True)


def test_spec_show_json_on_inf_stack_is_one_error_line(tmp_path, aidc_cli):
    path = _stack(tmp_path, "config:\n  aidc:cluster:\n    name: x\n    fabric: {link_speed_gbps: .inf}\n"
                            "    node_pools: [{name: x, count: 1, gpu_model: SIM, gpus_per_node: 1}]\n")
    proc = aidc_cli("spec", "show", "--stack", str(path), "--json")
    # Under --json the one error is a JSON object on stderr, and stdout holds nothing.
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    error = json.loads(proc.stderr)
    assert "fabric.link_speed_gbps" in error["error"] and "finite" in error["error"]


# f. and h. max_unavailable
@pytest.mark.parametrize("value", ["150%", "101%", "-5%", "abc", -1, True])
def test_max_unavailable_out_of_range_names_the_real_key(value):
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(policy={"max_unavailable": value}))
    assert err.value.key == "aidc:cluster.policy.max_unavailable"
    assert "an integer >= 0 or a percentage 0-100%" in err.value.expected
    assert "more problem" not in err.value.expected


@pytest.mark.parametrize("value", ["0%", "100%", 0, 3])
def test_max_unavailable_in_range_is_accepted(value):
    assert parse_spec(_spec(policy={"max_unavailable": value})).policy.max_unavailable == value


# g. node names colliding across pools
def test_node_names_colliding_across_pools_are_rejected_naming_both_pools():
    data = {"name": "x", "node_pools": [
        {"name": "gpu", "count": 1, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1},
        {"name": "gpu-spare", "count": 1, "gpu_model": "SIM", "gpus_per_node": 2}]}
    with pytest.raises(SpecError, match="gpu-spare-0.*'gpu'.*'gpu-spare'"):
        parse_spec(data)


# i. duplicate keys
def test_duplicate_yaml_keys_are_a_spec_error_naming_file_and_line(tmp_path, aidc_cli):
    path = _stack(tmp_path, "config:\n  aidc:cluster:\n    name: a\n    name: b\n"
                            "    node_pools: [{name: x, count: 1, gpu_model: SIM, gpus_per_node: 1}]\n")
    with pytest.raises(SpecError, match="duplicate key 'name'") as err:
        load_stack(path)
    assert err.value.key == "line 4"
    _one_error_line(aidc_cli("spec", "show", "--stack", str(path)), str(path), "line 4", "duplicate key")
