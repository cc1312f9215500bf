"""The CLI as a whole: every command explains itself, and every command that reports can
answer a machine (`--json`). Long-running services report through their logs instead."""

from __future__ import annotations

import typer.main
from typer.testing import CliRunner

from aidc.cli.main import GROUPS, app

SERVICES = {("failover", "run"), ("runbook", "serve"), ("goodput", "serve")}  # run until signalled; they log, not report


def leaf_commands():
    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, command

    return list(walk(typer.main.get_command(app), ()))


def test_every_group_is_installed():
    groups = {path[0] for path, _ in leaf_commands()}
    assert groups | {"inventory"} >= {name for _, name in GROUPS}


def test_every_command_has_a_help_text():
    for path, command in leaf_commands():
        assert (command.help or "").strip(), f"`aidc {' '.join(path)}` has no help text"
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"`aidc {' '.join(path)} --help` exited {result.exit_code}"


def test_every_reporting_command_offers_json():
    missing = [" ".join(path) for path, command in leaf_commands()
               if path not in SERVICES and "--json" not in {o for p in command.params for o in getattr(p, "opts", [])}]
    assert missing == [], f"commands without --json: {missing}"
