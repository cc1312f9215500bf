"""Every playbook a runbook names exists, passes the syntax check, and the safe ones really work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aidc.ansible import run_playbook
from aidc.runbook.catalog import Catalog

ROOT = Path(__file__).resolve().parents[2]


def _named_playbooks() -> set[str]:
    names = set()
    for rb in Catalog.load().runbooks.values():
        for step in (*rb.steps, *rb.on_failure):
            if step.kind == "playbook":
                names.add(step.raw["playbook"])
    return names


def test_every_playbook_a_runbook_names_exists():
    names = _named_playbooks()
    assert names, "the runbooks name no playbook at all"
    missing = sorted(n for n in names if not (ROOT / "playbooks" / n).is_file())
    assert missing == []


@pytest.mark.slow
def test_remediation_playbooks_pass_the_syntax_check(tmp_path):
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    playbooks = [f"playbooks/{n}" for n in sorted(_named_playbooks())]
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "--syntax-check",
                           "-i", "localhost,", *playbooks], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_prune_checkpoints_keeps_the_newest_and_is_idempotent(tmp_path, monkeypatch):
    """Run for real through the ansible-runner facade, on a throwaway directory only."""
    monkeypatch.setenv("ANSIBLE_HOME", str(tmp_path / "ansible-home"))
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for i in range(5):
        path = ckpt / f"step-{i}.pt"
        path.write_text(str(i))
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    (ckpt / "notes.txt").write_text("not a checkpoint")
    inventory = {"all": {"hosts": {"localhost": {"ansible_connection": "local",
                                                 "ansible_python_interpreter": sys.executable}}}}
    extravars = {"checkpoint_dir": str(ckpt), "keep": 2}
    first = run_playbook(ROOT / "playbooks" / "prune-checkpoints.yml", inventory=inventory, extravars=extravars,
                         timeout_s=240)
    assert first.ok, first.describe()
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt", "step-3.pt", "step-4.pt"]
    again = run_playbook(ROOT / "playbooks" / "prune-checkpoints.yml", inventory=inventory, extravars=extravars,
                         timeout_s=240)
    assert again.ok and again.changed == 0, again.describe()
