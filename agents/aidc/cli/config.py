"""Configuration of the long-running daemons (`aidc agent run`, `aidc failover run`, `aidc runbook
serve`): every option can also come from the environment or from a file.

Precedence, highest first: a flag on the command line > an `AIDC_<OPTION>` environment variable
(the option's long name, upper case, dashes as underscores: `--listen-address` is
`AIDC_LISTEN_ADDRESS`) > the `--config FILE` (or `AIDC_CONFIG`) YAML mapping of option names to
values > what the stack's spec says, where the command reads one (e.g. failover's
`policy.dry_run` when `--dry-run` is not set anywhere) > the option's default.

click already resolves exactly this order (command line, environment, `default_map`, default) and
records where each value came from; this module only feeds it the file and reports the result
(`--print-config`), so there is no second settings layer to keep in step with the options.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from aidc.errors import AidcError

ENV_PREFIX = "AIDC"
# Settings of the command line itself, not of the daemon: never read from a file.
NOT_SETTINGS = frozenset({"config_file", "print_config", "as_json"})
# A value under one of these names is shown as "<redacted>" (paths to key files are not secrets).
SECRET_WORDS = ("token", "password", "secret", "dsn")
SOURCES = {"COMMANDLINE": "flag", "ENVIRONMENT": "env", "DEFAULT_MAP": "file", "DEFAULT": "default",
           "PROMPT": "prompt"}

# context_settings of a daemon command: AIDC_<OPTION> for every option without its own variable.
DAEMON_SETTINGS = {"auto_envvar_prefix": ENV_PREFIX}


def _long_name(param) -> str:
    return next((o[2:] for o in param.opts if o.startswith("--")), param.name).replace("-", "_")


def _settings(command) -> dict[str, object]:
    """The command's settings by option name (`listen_address` for --listen-address)."""
    return {_long_name(param): param for param in command.params
            if param.name not in NOT_SETTINGS and getattr(param, "opts", None)}


def read_config_file(path: Path, valid: set[str]) -> dict:
    """The file's settings, keyed by parameter name; an unknown name is an error that lists the valid ones."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise AidcError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise AidcError(f"--config {path}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise AidcError(f"--config {path}: expected a mapping of option names to values, not {type(data).__name__}")
    settings = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise AidcError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(sorted(name.replace('_', '-') for name in valid))}")
    return settings


def _load(ctx: typer.Context, _param, value: Path | None):
    if value is not None:
        by_option = _settings(ctx.command)
        settings = read_config_file(Path(value), set(by_option))
        # click's default_map is keyed by parameter name
        ctx.default_map = {**(ctx.default_map or {}), **{by_option[k].name: v for k, v in settings.items()}}
    return value


def config_option():
    return typer.Option(None, "--config", envvar=f"{ENV_PREFIX}_CONFIG", is_eager=True, callback=_load,
                        help="YAML file of settings (option names without the dashes: `listen-address: "
                             "0.0.0.0:9400`). Precedence: flag > AIDC_<OPTION> environment > this file > "
                             "spec > default.")


def print_config_option():
    return typer.Option(False, "--print-config",
                        help="Print the resolved settings, each with where it came from (flag, env, file, "
                             "default), secrets redacted, and exit without starting.")


def is_secret(name: str) -> bool:
    return any(word in name for word in SECRET_WORDS)


def resolved(ctx: typer.Context, from_spec: dict | None = None) -> dict[str, dict]:
    """Every setting of the running command: value (secrets redacted), source, environment variable.
    `from_spec`: what the stack's spec says for settings not given as flag, env or file."""
    out = {}
    for name, param in _settings(ctx.command).items():
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        if (from_spec or {}).get(name) is not None and (source is None or source.name == "DEFAULT"):
            out[name.replace("_", "-")] = {"value": _plain(from_spec[name]), "source": "spec",
                                           "env": param.envvar or f"{ctx.auto_envvar_prefix}_{param.name.upper()}"}
            continue
        envvar = param.envvar or (f"{ctx.auto_envvar_prefix}_{param.name.upper()}" if ctx.auto_envvar_prefix else None)
        out[name.replace("_", "-")] = {
            "value": "<redacted>" if value and is_secret(name) else _plain(value),
            "source": SOURCES.get(source.name, source.name.lower()) if source else "default",
            "env": envvar if isinstance(envvar, str) else None,
        }
    return out


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def print_config(ctx: typer.Context, as_json: bool, from_spec: dict | None = None) -> None:
    """--print-config: the resolved settings on stdout, then exit 0."""
    settings = resolved(ctx, from_spec)
    if as_json:
        typer.echo(json.dumps(settings, indent=2, sort_keys=True, default=str))
    else:
        width = max(len(name) for name in settings)
        for name, entry in sorted(settings.items()):
            typer.echo(f"{name:<{width}}  {json.dumps(entry['value'], default=str):<30}  {entry['source']}")
    raise typer.Exit(0)
