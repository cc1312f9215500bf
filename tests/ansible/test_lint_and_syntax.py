"""The playbooks pass ansible-lint's production profile and ansible-playbook's syntax check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_sandbox import ROOT, inventory_script

BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    # ansible-lint and ansible write to ~/.ansible unless ANSIBLE_HOME says otherwise.
    return {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ansible-home"), "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.slow
def test_playbooks_pass_ansible_lint_production_profile(tmp_path):
    lint = BIN / "ansible-lint"
    if not lint.exists() and not shutil.which("ansible-lint"):
        pytest.skip("ansible-lint not installed (requirements.lock)")
    proc = subprocess.run([str(lint if lint.exists() else "ansible-lint"), "--offline", "--nocolor",
                           "--profile", "production", "playbooks/"],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_site_playbook_passes_syntax_check_with_the_generated_inventory(tmp_path):
    inventory = inventory_script(tmp_path, ROOT / "Pulumi.lab.yaml")
    proc = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(inventory),
                           "playbooks/site.yml"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: playbooks/site.yml" in proc.stdout


def test_site_playbook_lists_one_role_per_concern_in_the_documented_order():
    import yaml

    play, controller_play = yaml.safe_load((ROOT / "playbooks" / "site.yml").read_text())
    # Controller hosts run the controller's play only; training nodes never get it.
    assert play["hosts"] == "all:!aidc_controllers" and controller_play["hosts"] == "aidc_controllers"
    assert [r["role"] for r in controller_play["roles"]] == ["aidc_controller"]
    roles = [r["role"] for r in play["roles"]]
    assert roles == ["preflight", "kernel_prereqs", "nouveau_blocklist", "nvidia_driver", "fabric_manager",
                     "cuda", "rdma", "nccl", "dcgm", "tuning", "aidc_agent", "slurm_node"]
    guards = {r["role"]: r.get("when") for r in play["roles"]}
    for gpu_only in ("nouveau_blocklist", "nvidia_driver", "cuda", "dcgm"):
        assert guards[gpu_only] == "preflight_has_gpu"
    assert guards["fabric_manager"] == "preflight_has_nvswitch"
    assert guards["rdma"] == "preflight_has_rdma"
    assert guards["slurm_node"] == 'aidc_scheduler == "slurm"'
    for role in roles + ["aidc_controller", "aidc_install"]:
        assert (ROOT / "playbooks" / "roles" / role / "tasks" / "main.yml").is_file()
