"""What the aidc_agent role has pip install (through the aidc_install role): aidc with the agent
extra everywhere, and the burnin extra (torch, from PyTorch's CUDA index) where burn-in runs the
node program on the node itself (a Slurm stack's nodes), or where the inventory asks for it.

The variables are rendered by Ansible's templating as a run would: aidc_agent's defaults, the
case's inventory variables and aidc_agent's vars, passed to aidc_install by its include task,
then aidc_install's defaults and vars, in Ansible's precedence order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ansible_sandbox import ROOT

ROLES = ROOT / "playbooks" / "roles"
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"


# Rendered in a child process: importing Ansible's templating patches sys.intern for the whole
# process, and torch, imported later by other tests in this pytest process, then fails to import.
RENDER = """
import json, sys
from pathlib import Path
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

roles, inventory = Path(sys.argv[1]), json.loads(sys.argv[2])
loader = DataLoader()
load = lambda role, part: loader.load_from_file(str(roles / role / part / "main.yml"), trusted_as_template=True)
agent = {**load("aidc_agent", "defaults"), **inventory, **load("aidc_agent", "vars")}
[include] = [t for t in load("aidc_agent", "tasks") if "ansible.builtin.include_role" in t]
passed = Templar(loader=loader, variables=agent).template(include["vars"])
templar = Templar(loader=loader, variables={**load("aidc_install", "defaults"), **agent, **passed,
                                            **load("aidc_install", "vars")})
value = lambda name: templar.template(trust_as_template("{{ " + name + " }}"))
print(json.dumps([value("aidc_install_requirement"), list(value("aidc_install_more_extras")),
                  dict(value("aidc_install_extras_env")), dict(value("aidc_install_env"))]))
"""


def install(inventory: dict) -> tuple[str, dict]:
    """(the requirement of the extras' install task, its pip environment) for these host vars;
    no extras beyond agent: ("", the environment of the lock's and aidc's install tasks)."""
    done = subprocess.run([sys.executable, "-c", RENDER, str(ROLES), json.dumps(inventory)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, more, extras_env, env = json.loads(done.stdout)
    return (name, extras_env) if more else ("", env)


@pytest.mark.parametrize(("inventory", "requirement", "extra_index"), [
    ({"aidc_scheduler": "slurm"}, "aidc[agent,burnin]", TORCH_INDEX),
    ({"aidc_scheduler": "kubernetes"}, "", None),
    ({"aidc_scheduler": "lab"}, "", None),
    ({"aidc_scheduler": "slurm", "aidc_agent_burnin": False}, "", None),
    ({"aidc_scheduler": "kubernetes", "aidc_agent_burnin": True}, "aidc[agent,burnin]", TORCH_INDEX),
    ({"aidc_scheduler": "slurm", "aidc_agent_package": "aidc==0.1.0"}, "aidc[agent,burnin]==0.1.0", TORCH_INDEX),
    ({"aidc_scheduler": "slurm", "aidc_agent_torch_index_url": "https://mirror.example/whl/cu126",
      "aidc_agent_pip_env": {"PIP_INDEX_URL": "https://mirror.example/simple"}},
     "aidc[agent,burnin]", "https://mirror.example/whl/cu126"),
])
def test_the_burnin_extra_is_installed_where_burnin_runs_on_the_node(inventory, requirement, extra_index):
    name, env = install(inventory)
    assert name == requirement  # "": the agent extra only, whose dependencies are the hashed lock
    assert env.get("PIP_EXTRA_INDEX_URL") == extra_index
    assert env.get("PIP_INDEX_URL") == inventory.get("aidc_agent_pip_env", {}).get("PIP_INDEX_URL")


@pytest.mark.parametrize(("burnin", "requirement"), [(True, "aidc[agent,burnin]==0.1.0"), (False, "")])
def test_a_wheel_from_the_controller_installs_by_its_version_and_a_wheelhouse_is_read_alone(burnin, requirement):
    wheel = {"aidc_scheduler": "slurm", "aidc_agent_burnin": burnin,
             "aidc_agent_wheel": "/build/dist/aidc-0.1.0-py3-none-any.whl"}
    name, env = install(wheel)
    assert name == requirement
    assert "PIP_NO_INDEX" not in env  # a wheel alone: its dependencies come from the index
    name, env = install({**wheel, "aidc_agent_wheelhouse": "/build/wheelhouse"})
    assert name == requirement
    assert env == {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/opt/aidc/wheelhouse"}  # copied there, no index
    _, env = install({**wheel, "aidc_agent_wheelhouse": "/nfs/wheelhouse", "aidc_agent_wheelhouse_on_host": True})
    assert env == {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/nfs/wheelhouse"}  # read where the host has it
