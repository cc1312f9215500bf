"""The lab directory and its process records: what `lab run` may delete, what counts as a
running lab, and what `lab down` stops. Real processes (sleep), no lab brought up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aidc.lab import cluster as lab_cluster
from aidc.lab.cluster import LabCluster, LabError
from aidc.process import start_ticks
from aidc.spec import load_stack


@pytest.fixture
def spec():
    return load_stack("lab")


def test_a_directory_that_is_not_a_lab_is_never_deleted(spec, tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(LabError, match="holds no lab"):
        LabCluster(spec, tmp_path).create()
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_an_empty_or_old_lab_directory_is_used(spec, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    LabCluster(spec, empty).create()
    assert (empty / "lab.json").exists() and (empty / "nodes").is_dir()
    (empty / "old-report.html").write_text("from the last run")
    LabCluster(spec, empty).create()  # an idle old lab is replaced
    assert not (empty / "old-report.html").exists()


SLEEP_60 = [sys.executable, "-c", "import time; time.sleep(60)"]


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(SLEEP_60)


def record_owner(lab: LabCluster, pid: int, start: str | None) -> None:
    """Make `pid` (with that start time) the lab's recorded `aidc lab run`."""
    data = lab.info()
    data["owner"] = {"name": "lab-run", "pid": pid, "start": start}
    (lab.dir / "lab.json").write_text(json.dumps(data))


def test_a_lab_whose_run_is_still_burning_in_is_running_and_down_stops_that_run(spec, tmp_path):
    lab = LabCluster(spec, tmp_path / "lab")
    lab.create(owned=True)
    assert lab.running() == []  # its own run is not a stranger's
    other_run = sleeper()  # stands for another shell's `aidc lab run`, nothing else started yet
    try:
        record_owner(lab, other_run.pid, start_ticks(other_run.pid))
        assert [p["name"] for p in lab.running()] == ["lab-run"]
        with pytest.raises(LabError, match="already running"):
            LabCluster(spec, lab.dir).create()
        assert (lab.dir / "nodes").is_dir()  # untouched
        assert lab.stop(timeout_s=10) == 1
        assert other_run.wait(timeout=10) == -15  # SIGTERM: the run cleans up as on Ctrl-C
        assert lab.running() == []
        lab.disown()
        assert lab.info()["owner"] is None
    finally:
        other_run.kill()
        other_run.wait()


def test_the_owner_record_of_an_earlier_process_with_the_same_pid_is_not_a_running_lab(spec, tmp_path):
    lab = LabCluster(spec, tmp_path / "lab")
    lab.create()
    live = sleeper()
    try:
        record_owner(lab, live.pid, str(int(start_ticks(live.pid)) - 1))
        assert lab.running() == []
    finally:
        live.kill()
        live.wait()


def test_down_forgets_what_it_stopped_so_a_reused_process_group_is_never_signalled(spec, tmp_path):
    lab = LabCluster(spec, tmp_path / "lab")
    lab.create()
    lab.start("dummy", SLEEP_60)
    assert lab.stop(timeout_s=10) == 1
    assert lab.info()["processes"] == []
    assert lab.stop(timeout_s=1) == 0


def test_a_recorded_pid_now_owned_by_another_user_is_not_alive(monkeypatch):
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(lab_cluster.os, "kill", kill)
    monkeypatch.setattr(lab_cluster.os, "waitpid", lambda pid, flags: (_ for _ in ()).throw(ChildProcessError()))
    assert lab_cluster._alive(os.getpid() + 1) is False
