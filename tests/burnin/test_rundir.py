"""A burn-in run's temp directory goes away on every exit: the ones its process sees, and (swept by
the next run) the ones it cannot, as SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from aidc.burnin.rundir import PREFIX, run_directory, sweep_stale

# A run that makes its directory, says where, and waits to be killed.
HOLDER = ("import sys, time; from aidc.burnin.rundir import run_directory\n"
          "with run_directory('lab') as p:\n    print(p, flush=True); time.sleep(60)")


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _holder(root):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(root)})
    return proc, proc.stdout.readline().strip()


def test_the_directory_is_private_and_removed_on_a_normal_exit_and_on_an_error(temp_root):
    with run_directory("lab") as path:
        assert path.parent == temp_root and path.name.startswith(f"{PREFIX}lab-")
        assert oct(path.stat().st_mode & 0o777) == "0o700"
    assert not path.exists()
    with pytest.raises(RuntimeError), run_directory("slurm") as path:
        raise RuntimeError("a node died")
    assert not path.exists() and list(temp_root.iterdir()) == []


def test_a_killed_runs_directory_is_swept_by_the_next_run_and_a_live_ones_is_kept(temp_root):
    dead, dead_path = _holder(temp_root)
    live, live_path = _holder(temp_root)
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(timeout=10)
        foreign = temp_root / f"{PREFIX}other"  # no owner lock: not aidc's to judge
        foreign.mkdir()
        assert {p.name for p in temp_root.iterdir()} == {os.path.basename(dead_path), os.path.basename(live_path),
                                                         foreign.name}
        with run_directory("lab") as mine:  # a new run sweeps what the killed one left
            assert sorted(p.name for p in temp_root.iterdir()) == sorted(
                [os.path.basename(live_path), foreign.name, mine.name])
        assert sweep_stale(temp_root) == []
    finally:
        live.kill()
        live.wait(timeout=10)
    assert [p.name for p in sweep_stale(temp_root)] == [os.path.basename(live_path)]
