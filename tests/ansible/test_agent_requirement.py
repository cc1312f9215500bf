"""What the aidc_agent role's install task gives pip: aidc with the agent extra everywhere, and
the burnin extra (torch, from PyTorch's CUDA index) where burn-in runs the node program on the
node itself (a Slurm stack's nodes), or where the inventory asks for it.

The task's own `name` and `environment` are rendered by Ansible's templating with the role's
defaults, the case's inventory variables and the role's vars, in Ansible's precedence order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ansible_sandbox import ROOT

ROLE = ROOT / "playbooks" / "roles" / "aidc_agent"
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"


# Rendered in a child process: importing Ansible's templating patches sys.intern for the whole
# process, and torch, imported later by other tests in this pytest process, then fails to import.
RENDER = """
import json, sys
from pathlib import Path
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar

role, inventory = Path(sys.argv[1]), json.loads(sys.argv[2])
loader = DataLoader()
[task] = [t for t in loader.load_from_file(str(role / "tasks" / "main.yml"), trusted_as_template=True)
          if "ansible.builtin.pip" in t]
variables = {**loader.load_from_file(str(role / "defaults" / "main.yml"), trusted_as_template=True), **inventory,
             **loader.load_from_file(str(role / "vars" / "main.yml"), trusted_as_template=True)}
templar = Templar(loader=loader, variables=variables)
print(json.dumps([templar.template(task["ansible.builtin.pip"]["name"]), dict(templar.template(task["environment"]))]))
"""


def install(inventory: dict) -> tuple[str, dict]:
    """(the pip requirement, the pip environment) the install task renders for these host vars."""
    done = subprocess.run([sys.executable, "-c", RENDER, str(ROLE), json.dumps(inventory)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, env = json.loads(done.stdout)
    return name, env


@pytest.mark.parametrize(("inventory", "requirement", "extra_index"), [
    ({"aidc_scheduler": "slurm"}, "aidc[agent,burnin]", TORCH_INDEX),
    ({"aidc_scheduler": "kubernetes"}, "aidc[agent]", None),
    ({"aidc_scheduler": "lab"}, "aidc[agent]", None),
    ({"aidc_scheduler": "slurm", "aidc_agent_burnin": False}, "aidc[agent]", None),
    ({"aidc_scheduler": "kubernetes", "aidc_agent_burnin": True}, "aidc[agent,burnin]", TORCH_INDEX),
    ({"aidc_scheduler": "slurm", "aidc_agent_package": "aidc==0.1.0"}, "aidc[agent,burnin]==0.1.0", TORCH_INDEX),
    ({"aidc_scheduler": "slurm", "aidc_agent_torch_index_url": "https://mirror.example/whl/cu126",
      "aidc_agent_pip_env": {"PIP_INDEX_URL": "https://mirror.example/simple"}},
     "aidc[agent,burnin]", "https://mirror.example/whl/cu126"),
])
def test_the_burnin_extra_is_installed_where_burnin_runs_on_the_node(inventory, requirement, extra_index):
    name, env = install(inventory)
    assert name == requirement
    assert env.get("PIP_EXTRA_INDEX_URL") == extra_index
    assert env.get("PIP_INDEX_URL") == inventory.get("aidc_agent_pip_env", {}).get("PIP_INDEX_URL")


@pytest.mark.parametrize(("burnin", "requirement"), [(True, "aidc[agent,burnin]==0.1.0"), (False, "aidc[agent]==0.1.0")])
def test_a_wheel_from_the_controller_installs_by_its_version_with_the_extras_from_its_directory_only(burnin, requirement):
    name, env = install({"aidc_scheduler": "slurm", "aidc_agent_burnin": burnin,
                         "aidc_agent_wheel": "/build/dist/aidc-0.1.0-py3-none-any.whl"})
    assert name == requirement
    assert env == {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/opt/aidc"}
