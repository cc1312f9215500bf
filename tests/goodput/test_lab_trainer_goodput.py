"""The lab trainer writes the goodput step log and checkpoints in the background (one worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aidc.checkpoint import CheckpointDir
from aidc.device import sim
from aidc.goodput import job_report, read_step_log
from aidc.kms.local import LocalKeyring
from aidc.polling import free_port

WORKER = """
import json, sys
from aidc.lab.trainer import train
sys.exit(train(json.loads(sys.argv[1])))
"""


def _train_one_worker(tmp_path, mode: str, steps: int = 6) -> subprocess.CompletedProcess:
    lab = tmp_path / mode
    sim.create_node(lab / "nodes" / "gpu-0", "gpu-0", 1)
    LocalKeyring.create(lab / "keyring", "lab-key")
    cfg = {"lab_dir": str(lab), "node": "gpu-0", "job": "aidc-lab", "keyring": str(lab / "keyring"),
           "total_steps": steps, "checkpoint_every": 1, "seed": 1, "lr": 0.05, "checkpoint_mode": mode}
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.run([sys.executable, "-c", WORKER, json.dumps(cfg)], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_trainer_logs_every_step_and_checkpoint_and_the_last_checkpoint_is_on_disk(tmp_path, mode):
    r = _train_one_worker(tmp_path, mode)
    assert r.returncode == 0, r.stderr[-2000:]
    lab = tmp_path / mode
    records = read_step_log(lab / "train" / "goodput.jsonl")
    kinds = [rec["kind"] for rec in records]
    assert kinds.count("start") == 1 and kinds.count("step") == 6 and kinds[-1] == "end"
    assert {rec["mode"] for rec in records if rec["kind"] == "checkpoint"} == {mode}
    durable = [rec["step"] for rec in records if rec["kind"] == "checkpoint_durable"]
    assert durable == ([1, 2, 3, 4, 5, 6] if mode == "async" else [])
    ckpts = CheckpointDir(lab / "checkpoints", job="aidc-lab", kms=LocalKeyring(lab / "keyring"))
    assert ckpts.steps()[-1] == 6  # the final write finished before the job said it was done
    g = job_report(lab / "train" / "goodput.jsonl")
    assert g.steps_kept == 6 and g.checkpoints == 6 and 0 < g.ettr <= 1
