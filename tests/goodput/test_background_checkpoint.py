"""Asynchronous checkpoints: a snapshot now, the encrypted write in the background."""

from __future__ import annotations

import threading

import pytest
import torch

from aidc.checkpoint import BackgroundCheckpointWriter, CheckpointDir, load
from aidc.kms.local import LocalKeyring


@pytest.fixture
def ckpt_dir(tmp_path):
    return CheckpointDir(tmp_path / "ckpt", job="j", kms=LocalKeyring.create(tmp_path / "keyring", "k"), keep=2,
                         fsync=False)


def test_the_checkpoint_holds_the_state_at_save_time_not_after_later_training(ckpt_dir):
    weights = torch.zeros(1000)
    durable = []
    writer = BackgroundCheckpointWriter(ckpt_dir, on_durable=lambda step, write_s: durable.append(step))
    writer.save(1, {"model": {"w": weights}})
    weights += 1.0  # the next step changes the parameters in place while the write may still run
    assert writer.wait() is True
    state = load(ckpt_dir.path(1), job="j", kms=ckpt_dir.kms)
    assert torch.equal(state["model"]["w"], torch.zeros(1000))
    assert durable == [1]


def test_one_write_in_flight_the_next_save_waits_and_old_checkpoints_are_pruned(ckpt_dir):
    writer = BackgroundCheckpointWriter(ckpt_dir)
    for step in range(1, 5):
        writer.save(step, {"w": torch.full((10,), float(step))})
    writer.wait()
    assert ckpt_dir.steps() == [3, 4]
    assert not list(ckpt_dir.dir.glob(".*.tmp"))  # written through a temp file and renamed


def test_a_failed_background_write_is_raised_by_the_next_wait_not_dropped(ckpt_dir):
    ckpt_dir.kms = None  # wrapping the data key fails in the writer thread
    writer = BackgroundCheckpointWriter(ckpt_dir)
    writer.save(1, {"w": torch.zeros(3)})
    with pytest.raises(Exception):
        writer.wait()
    assert writer.wait() is True  # raised once
    assert ckpt_dir.steps() == []


def test_wait_with_a_timeout_reports_a_write_still_running(ckpt_dir):
    gate = threading.Event()
    save = ckpt_dir.save
    ckpt_dir.save = lambda step, state: (gate.wait(5), save(step, state))
    writer = BackgroundCheckpointWriter(ckpt_dir)
    writer.save(1, {"w": torch.zeros(3)})
    assert writer.wait(0.01) is False
    gate.set()
    assert writer.wait(5) is True and ckpt_dir.steps() == [1]
