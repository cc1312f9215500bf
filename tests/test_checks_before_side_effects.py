"""A command that cannot do its work says so before it changes anything.

A command lacking an extra (torch here, blocked by an import hook as an installation without it
would be) fails with one line naming the extra, and leaves no lab directory, audit log or network
namespace behind; `aidc lab run` takes a lab directory that holds only what other aidc commands
put there; and `aidc runbook render` writes into a checkout's docs/runbooks/ or into --out,
never into whatever directory it runs from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aidc.audit.log import AuditLog
from aidc.lab.cluster import LabCluster, LabError
from aidc.lab.fabric import lab_tag, list_namespaces
from aidc.spec import load_stack
from aidc.store import Store

ROOT = Path(__file__).resolve().parents[1]
LAB_STACK = str(ROOT / "Pulumi.lab.yaml")

# Installed as sitecustomize: every `import torch` fails as it does where torch is not installed.
NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture
def without_torch(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT / "agents")])}
    env.pop("AIDC_ROOT", None)
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "aidc", *args], capture_output=True, text=True, timeout=120,
                              cwd=work, env=env)

    return run, work


def test_the_hook_really_hides_torch(without_torch):
    run, work = without_torch
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, cwd=work,
                           env={**os.environ, "PYTHONPATH": str(work.parent / "hook")})
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr


@pytest.mark.parametrize("command, extra", [
    (["burnin", "run"], "burnin"),
    (["lab", "run"], "lab"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_missing_extra_is_said_in_one_line_before_anything_is_made(without_torch, command, extra, as_json):
    run, work = without_torch
    proc = run(*command, "--stack", LAB_STACK, *(["--json"] if as_json else []))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    message = json.loads(lines[0])["error"] if as_json else lines[0]
    assert "torch" in message and f"aidc[{extra}]" in message
    # Nothing in the working directory (the default --lab-dir is .aidc/lab under it), and no
    # namespace of that lab left behind (other tests on this machine make namespaces of their own).
    assert sorted(os.listdir(work)) == []
    assert list_namespaces(lab_tag(work / ".aidc/lab")) == []


# -- a lab directory that holds only aidc's own state ---------------------------------------------
@pytest.fixture
def spec():
    return load_stack(LAB_STACK)


def _burnin_leftovers(spec, lab_dir: Path) -> None:
    """What `aidc burnin run`, `aidc failover` and `aidc kms` leave in a lab directory."""
    from aidc.burnin.runner import lab_node_dirs
    from aidc.kms.local import LocalKeyring

    lab_node_dirs(spec, lab_dir)
    with AuditLog(lab_dir / "audit.db") as log:
        log.append("burnin.run", "burn-in", actor="t")
    Store(lab_dir / "state.db")
    LocalKeyring.create(lab_dir / "keyring", spec.kms.key_id)
    (lab_dir / "known_answers.yaml").write_text("answers: {}\n")
    (lab_dir / "fabric.json").write_text("{}")


def test_a_directory_holding_only_what_aidc_commands_left_becomes_the_lab(spec, tmp_path):
    lab_dir = tmp_path / "lab"
    _burnin_leftovers(spec, lab_dir)
    LabCluster(spec, lab_dir).create()
    assert (lab_dir / "lab.json").exists() and (lab_dir / "nodes").is_dir()
    # Known answers are what an operator recorded on purpose (`--record-known-answers`): kept.
    assert (lab_dir / "known_answers.yaml").read_text() == "answers: {}\n"


def test_known_answers_survive_a_new_lab_over_an_old_one(spec, tmp_path):
    lab_dir = tmp_path / "lab"
    LabCluster(spec, lab_dir).create()
    (lab_dir / "known_answers.yaml").write_text("answers: {k: 1}\n")
    LabCluster(spec, lab_dir).create()
    assert (lab_dir / "known_answers.yaml").read_text() == "answers: {k: 1}\n"


@pytest.mark.parametrize("foreign", ["notes.txt", "audit.db.bak", ".git", "Pulumi.yaml", "nodes.old"])
def test_anything_else_in_the_directory_still_keeps_it_from_being_replaced(spec, tmp_path, foreign):
    lab_dir = tmp_path / "lab"
    _burnin_leftovers(spec, lab_dir)
    (lab_dir / foreign).write_text("mine")
    before = sorted(p.relative_to(lab_dir) for p in lab_dir.rglob("*"))
    with pytest.raises(LabError, match=f"holds no lab.*{foreign}"):
        LabCluster(spec, lab_dir).create()
    assert sorted(p.relative_to(lab_dir) for p in lab_dir.rglob("*")) == before


# -- runbook render --------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("AIDC_ROOT", "AIDC_RUNBOOKS")}
    return subprocess.run([sys.executable, "-m", "aidc", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


@pytest.mark.parametrize("as_json", [False, True])
def test_runbook_render_outside_a_checkout_asks_for_out_and_writes_nothing(tmp_path, as_json):
    proc = _cli("runbook", "render", *(["--json"] if as_json else []), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert "--out" in (json.loads(line)["error"] if as_json else line)
    assert os.listdir(tmp_path) == []


def test_runbook_render_in_a_checkout_refreshes_its_docs_runbooks_from_any_subdirectory(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "docs" / "runbooks").mkdir(parents=True)
    (checkout / "sub" / "dir").mkdir(parents=True)
    (checkout / "Pulumi.yaml").write_text((ROOT / "Pulumi.yaml").read_text())
    shutil.copytree(ROOT / "runbooks", checkout / "runbooks")
    proc = _cli("runbook", "render", "--json", cwd=checkout / "sub" / "dir")
    assert proc.returncode == 0, proc.stderr
    written = [Path(p) for p in json.loads(proc.stdout)]
    assert written and all(p.parent == checkout / "docs" / "runbooks" for p in written)
    assert os.listdir(checkout / "sub" / "dir") == []
    assert sorted(p.name for p in written) == sorted(p.name for p in (ROOT / "docs/runbooks").glob("*.md"))
