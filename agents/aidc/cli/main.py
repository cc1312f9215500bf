"""Entry point of the `aidc` command. Each stage adds its own sub-command group."""

from __future__ import annotations

import importlib
import sys

import typer

from aidc.errors import AidcError

app = typer.Typer(
    name="aidc",
    help="aidc: burn in, watch, fail over and audit GPU training clusters, from one cluster spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module, command name). A module exposes `app`, a typer.Typer. Imported lazily per
# command would be faster still; importing these is cheap because heavy imports
# (torch, pulumi, ansible) happen inside the commands.
GROUPS = [
    ("aidc.cli.spec_cmd", "spec"),
    ("aidc.cli.device_cmd", "device"),
    ("aidc.cli.audit_cmd", "audit"),
    ("aidc.cli.failover_cmd", "failover"),
    ("aidc.cli.lab_cmd", "lab"),
    ("aidc.cli.health_cmd", "health"),
    ("aidc.cli.agent_cmd", "agent"),
    ("aidc.cli.runbook_cmd", "runbook"),
    ("aidc.cli.burnin_cmd", "burnin"),
    ("aidc.cli.inventory_cmd", "inventory"),
    ("aidc.cli.compress_cmd", "compress"),
    ("aidc.cli.kms_cmd", "kms"),
]

for module, name in GROUPS:
    try:
        sub = importlib.import_module(module).app
    except ModuleNotFoundError as exc:  # a group under construction must not break the others
        if exc.name != module:
            raise
        continue
    app.add_typer(sub, name=name)


def main() -> None:
    try:
        app()
    except AidcError as exc:
        typer.echo(f"aidc: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("aidc: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
