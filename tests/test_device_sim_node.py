"""`aidc device sim-node`: the aidc_agent role lays out a `device_backend: sim` host's simulated node."""

from __future__ import annotations

import json

import pytest

from aidc.device import open_backend, sim
from aidc.errors import DeviceError


def test_sim_node_lays_out_a_node_the_sim_backend_reads_and_keeps_an_existing_one(tmp_path, aidc_cli):
    node_dir = tmp_path / "sim"
    made = aidc_cli("device", "sim-node", str(node_dir), "--node", "gpu-0", "--gpus", "2", "--rails", "1", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) == {"node_dir": str(node_dir), "node": "gpu-0", "created": True}
    dev = open_backend("sim", node_dir=node_dir)
    assert dev.gpu_count() == 2
    sim.inject(node_dir, "xid", 1, xid=79)
    again = aidc_cli("device", "sim-node", str(node_dir), "--node", "gpu-0", "--gpus", "2", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False
    with pytest.raises(DeviceError, match="fallen off the bus"):  # the injected fault stayed
        open_backend("sim", node_dir=node_dir).telemetry(1)


def test_sim_node_refuses_a_gpu_count_outside_a_node(tmp_path, aidc_cli):
    done = aidc_cli("device", "sim-node", str(tmp_path / "n"), "--node", "n", "--gpus", "0")
    assert done.returncode == 2 and "--gpus" in done.stderr
    assert not (tmp_path / "n").exists()
