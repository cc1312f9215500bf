"""The DaemonSet runs the real agent command, with flags the agent's CLI accepts."""

import sys
from pathlib import Path

import typer.main

from aidc.cli.agent_cmd import app as agent_app
from aidc.spec import load_stack

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "infra"))
from aidc_infra.agent import agent_command  # noqa: E402


def test_daemonset_command_is_aidc_agent_run_with_known_flags_only():
    spec = load_stack("h100-example")
    cmd = agent_command(spec)
    assert cmd[:3] == ["aidc", "agent", "run"]
    command = typer.main.get_command(agent_app)
    run = command.commands["run"] if hasattr(command, "commands") else command  # a one-command app
    known = {opt for p in run.params for opt in p.opts}
    flags = [a for a in cmd[3:] if a.startswith("--")]
    assert flags and set(flags) <= known, set(flags) - known
    assert cmd[cmd.index("--node") + 1] == "$(AIDC_NODE)"
    assert cmd[cmd.index("--backend") + 1] == "nvml"
    assert cmd[cmd.index("--listen-address") + 1] == f"0.0.0.0:{spec.agent.metrics_port}"
