"""The CLI's one vocabulary: the options every command spells the same way, built here.

A command that needs one of these takes it from here instead of declaring its own:

    from aidc.cli.options import actor_option, listen_option, stack_option, state_dir_option

    def run(stack: str | None = stack_option(), state_dir: Path | None = state_dir_option(), ...):
        stack, state_dir = resolve_stack_and_state_dir(stack, state_dir)

| concept                     | spelling                    | environment       |
|-----------------------------|-----------------------------|-------------------|
| where state files live      | `--state-dir DIR`           | `AIDC_STATE_DIR`  |
| the stack                   | `--stack NAME|PATH` (`-s`)  | `AIDC_STACK`      |
| who acts (audited)          | `--actor NAME`              |                   |
| where a daemon listens      | `--listen-address HOST:PORT`|                   |
| seconds between looks       | `--poll-interval S`         |                   |
| the audit log (SQLite file) | `--audit-db PATH`           |                   |
| the state database          | `--state sqlite:PATH|postgres:DSN` | `AIDC_STATE` |
| log lines                   | `--log-format text|json`    |                   |

Fixed sets (`--backend`, `--scheduler`, `--dcgm-exporter`, `--log-format`) take one of a fixed set of names,
built from the registries, so a typo is a usage error that lists the valid names and shells
complete them. Old spellings (DEPRECATED) are rewritten by `VocabularyGroup` before click parses
the command line, with one warning line on stderr: they keep working for one release.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from typer.core import TyperGroup

from aidc.errors import AidcError

LAB_STATE_DIR = Path(".aidc/lab")
LAB_STACK = "lab"

# Old spelling -> the vocabulary's. Rewritten only for a command that declares the new spelling
# and not the old one (kms's --lab-dir means "the lab's keyring", not a state directory).
# `--port`/`--metrics-port` fold into --listen-address HOST:PORT (see _fold_port).
DEPRECATED = {
    "--lab-dir": "--state-dir",
    "--by": "--actor",
    "--poll": "--poll-interval",
    "--db": "--audit-db",
    "--host": "--listen-address",
    "--listen": "--ingest-address",
    "--port": "--listen-address",
    "--metrics-port": "--listen-address",
    "--dsn": "--state",
    "--state-db": "--state",
}
PORT_SPELLINGS = ("--port", "--metrics-port")
REMOVED_IN = "the next release"

DEVICE_BACKENDS = ("nvml", "sim")
LOG_FORMATS = ("text", "json")
DCGM_EXPORTER = ("absent", "present")


def deprecation_line(old: str, new: str) -> str:
    shown = f"{new} HOST:PORT" if old in PORT_SPELLINGS or old == "--host" else new
    return f"aidc: warning: {old} is deprecated and goes away in {REMOVED_IN}; use {shown}"


# typer vendors its own trimmed click (no Group class to test against): a group is a command
# with subcommands.
def is_group(command) -> bool:
    return getattr(command, "commands", None) is not None


def option_names(command) -> set[str]:
    return {name for param in command.params for name in (*getattr(param, "opts", ()),
                                                           *getattr(param, "secondary_opts", ()))}


def _leaf(group, ctx, args: list[str]):
    """The command an argument list runs below `group` (subcommand names are the leading words)."""
    command = group
    for word in args:
        if word.startswith("-"):
            continue  # a group's own option (--version); groups here take no option values
        if not is_group(command):
            return command
        sub = command.get_command(ctx, word)
        if sub is None:
            return None
        command = sub
    return None if is_group(command) else command


def rewrite_deprecated(command, args: list[str], warn=None) -> list[str]:
    """`args` with each old spelling the command no longer declares replaced by the new one; each
    replacement warned about once. Values after `--` are left alone."""
    names = option_names(command)
    if warn is None:
        # AIDC_DEPRECATION_WARNINGS=off: for a script that parses stderr and cannot change yet.
        quiet = os.environ.get("AIDC_DEPRECATION_WARNINGS", "").lower() == "off"
        warn = (lambda _line: None) if quiet else (lambda line: typer.echo(line, err=True))
    out: list[str] = []
    ports: list[str] = []
    warned: set[str] = set()
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            out.extend(args[i:])
            break
        flag, eq, inline = word.partition("=")
        new = DEPRECATED.get(flag)
        if new is None or flag in names or new not in names:
            out.append(word)
            i += 1
            continue
        if flag not in warned:
            warned.add(flag)
            warn(deprecation_line(flag, new))
        if flag in PORT_SPELLINGS:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            ports.append(value)
            i += 1 if eq else 2
            continue
        out.append(new + eq + inline)
        i += 1
    if ports:
        out = _fold_port(command, out, ports[-1])
    if "--lab-dir" in warned and "--stack" in names and not os.environ.get("AIDC_STACK") and not any(
            w in ("--stack", "-s") or w.startswith("--stack=") for w in out):
        # The old spelling keeps its old meaning for its last release: the lab stack unless named.
        # Only --state-dir (the new spelling) asks for --stack outside the lab.
        out = [*out, "--stack", LAB_STACK]
    return out


def _fold_port(command, args: list[str], port: str) -> list[str]:
    """`--port P` of old: the port of --listen-address, whose host is the one given (or the default)."""
    param = next(p for p in command.params if "--listen-address" in p.opts)
    host, index = None, None
    for i, word in enumerate(args):
        if word == "--listen-address" and i + 1 < len(args):
            host, index = args[i + 1], i
        elif word.startswith("--listen-address="):
            host, index = word.partition("=")[2], i
    if host is None:
        default = param.default if isinstance(param.default, str) else None
        host = default.rpartition(":")[0] if default and ":" in default else (default or "127.0.0.1")
        return [*args, "--listen-address", f"{_host_of(host)}:{port}"]
    rest = args[:index] + args[index + (1 if "=" in args[index] else 2):]
    return [*rest, "--listen-address", f"{_host_of(host)}:{port}"]


def _host_of(value: str) -> str:
    """The host part of HOST or HOST:PORT (an IPv6 address is bracketed when it has a port)."""
    if value.startswith("["):
        return value.partition("]")[0] + "]"
    if value.count(":") == 1:
        return value.partition(":")[0]
    return f"[{value}]" if ":" in value else value


class VocabularyGroup(TyperGroup):
    """A command group that accepts the old spellings of the vocabulary (DEPRECATED) for one more
    release, and `-h` as well as `--help` on every command below it."""

    def __init__(self, *args, **kwargs):
        settings = kwargs.setdefault("context_settings", {}) or {}
        settings.setdefault("help_option_names", ["-h", "--help"])
        kwargs["context_settings"] = settings
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if not ctx.meta.get("aidc.vocabulary"):  # the outermost group rewrites; the inner ones see it done
            ctx.meta["aidc.vocabulary"] = True
            leaf = _leaf(self, ctx, args)
            if leaf is not None:
                args = rewrite_deprecated(leaf, list(args))
        return super().parse_args(ctx, args)


def group(**kwargs) -> typer.Typer:
    """A command group speaking the vocabulary: `app = options.group(help=...)`."""
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(cls=VocabularyGroup, **kwargs)


# ---- option builders ----

def state_dir_option(lab: bool = False, help: str | None = None):
    """--state-dir: the lab's commands default to .aidc/lab; the others need it (or AIDC_STATE_DIR),
    except with the lab stack (see resolve_stack_and_state_dir)."""
    text = help or ("Directory of this installation's state (event store, audit log, lease): "
                    "/var/lib/aidc in production" + ("." if lab else "; .aidc/lab only for the lab stack."))
    return typer.Option(LAB_STATE_DIR if lab else None, "--state-dir", envvar="AIDC_STATE_DIR",
                        show_envvar=True, help=text)


def stack_option(help: str | None = None):
    return typer.Option(None, "--stack", "-s", envvar="AIDC_STACK", show_envvar=True,
                        help=help or "Stack name (reads Pulumi.<stack>.yaml) or a path; `lab` only when "
                                     "the state directory is the lab's.")


def lab_stack_option(help: str | None = None):
    """--stack of the lab's own commands: the lab stack unless told otherwise."""
    return typer.Option(LAB_STACK, "--stack", "-s", envvar="AIDC_STACK", show_envvar=True,
                        help=help or "Stack name (reads Pulumi.<stack>.yaml) or a path.")


def actor_option(help: str | None = None):
    return typer.Option(None, "--actor", help=help or "A note on who acts (e.g. a full name), recorded in "
                                                       "the audit log beside the login identity.")


def listen_option(default: str | None, help: str):
    return typer.Option(default, "--listen-address", metavar="HOST:PORT", help=help)


def poll_interval_option(default: float, help: str):
    return typer.Option(default, "--poll-interval", min=0.001, help=help)


def audit_db_option(default: Path | None, help: str = "Audit log database (SQLite)."):
    return typer.Option(default, "--audit-db", help=help)


def choice_option(default, flag: str, names, help: str):
    """An option whose value is one of a fixed set (a registry's names): another value is a usage
    error naming the valid ones, and shells complete them. (typer here has no click_type, so the
    set travels as the parser's `choices`, which the surface test reads.)"""
    names = tuple(names)

    def parse(value: str) -> str:
        if value not in names:
            raise typer.BadParameter(f"{value!r}; valid: {', '.join(names)}")
        return value

    parse.choices = names
    return typer.Option(default, flag, parser=parse, metavar="[" + "|".join(names) + "]", help=help,
                        autocompletion=lambda incomplete: [n for n in names if n.startswith(incomplete)])


def choices_of(param) -> tuple[str, ...] | None:
    """The fixed set an option takes (a choice_option), None for free text."""
    info = getattr(getattr(param, "type_descriptor", None), "parameter_info", None)
    return getattr(getattr(info, "parser", None), "choices", None)


def log_format_option(default: str = "text"):
    return choice_option(default, "--log-format", LOG_FORMATS,
                         "json: one JSON object per line on stderr (for log shippers; one schema for every "
                         "daemon); text: a time and a sentence per line.")


def scheduler_names() -> list[str]:
    from aidc.failover.backends import BACKENDS

    return sorted(BACKENDS)


# ---- resolution ----

def is_lab_dir(path: Path) -> bool:
    """A directory the lab made (or is making): its manifest or its nodes."""
    return (path / "lab.json").exists() or (path / "nodes").is_dir()


def is_lab_stack(stack: str) -> bool:
    """The lab stack, by name or by its file (`--stack Pulumi.lab.yaml`)."""
    return stack == LAB_STACK or Path(stack).name == f"Pulumi.{LAB_STACK}.yaml"


def resolve_stack_and_state_dir(stack: str | None, state_dir: Path | None) -> tuple[str, Path]:
    """Neither given: the lab (stack `lab` in .aidc/lab). Outside the lab both are named: a
    production command never falls back to the lab's directory or stack silently."""
    if stack is None and state_dir is None:
        return LAB_STACK, LAB_STATE_DIR
    if stack is None:
        if is_lab_dir(state_dir):
            return LAB_STACK, state_dir
        raise AidcError(f"--stack is required outside the lab (or AIDC_STACK): {state_dir} holds no lab")
    if state_dir is None:
        if is_lab_stack(stack):
            return stack, LAB_STATE_DIR
        raise AidcError(f"--state-dir is required for stack {stack} (or AIDC_STATE_DIR; e.g. /var/lib/aidc): "
                        "the lab's .aidc/lab is used only for the lab stack")
    return stack, state_dir


def parse_listen(value: str | None, default_port: int | None, flag: str = "--listen-address"):
    """HOST:PORT (or a bare HOST, taking default_port) -> (host, port); None when value is None or
    no port is known. An IPv6 address is written [::1]:9400."""
    import ipaddress

    if value is None:
        return None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, None
    if port is None or port == "":
        if default_port is None:
            return None
        port = str(default_port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise typer.BadParameter(f"HOST:PORT with an IP address (127.0.0.1, 0.0.0.0, [::], the pod IP), not "
                                 f"{value!r}", param_hint=flag) from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"a port from 0 to 65535, not {port!r}", param_hint=flag)
    return host, int(port)


def audit_db_path(audit_db: Path | None, state_dir: Path | None) -> Path:
    """The audit log a reading command opens: named, in the state directory, or the lab's (only
    where .aidc/lab holds a lab)."""
    if audit_db is not None:
        return audit_db
    if state_dir is not None:
        return state_dir / "audit.db"
    if is_lab_dir(LAB_STATE_DIR):
        return LAB_STATE_DIR / "audit.db"
    raise AidcError("name the audit log: --audit-db PATH, or --state-dir DIR (or AIDC_STATE_DIR) holding audit.db")


# ---- the state's location ----

STATE_ENV = "AIDC_STATE"


class StateLocation:
    """Where a command's state lives, from `--state` (or AIDC_STATE): `backend` is a state backend
    name (aidc.state) and `location` its argument, a SQLite file path or a PostgreSQL DSN."""

    __slots__ = ("backend", "location")

    def __init__(self, backend: str, location: str):
        self.backend, self.location = backend, location

    def __str__(self) -> str:
        """As the user wrote it (`--print-config` shows this), save a DSN's password (which
        AIDC_STATE may carry)."""
        from aidc.spec import dsn_has_password

        if self.backend == "postgres" and dsn_has_password(self.location):
            return f"{self.backend}:<a DSN with a password, not shown>"
        return f"{self.backend}:{self.location}"

    __repr__ = __str__

    def spec_state(self):
        """This location as a stack's `state:` section, which it overrides. Built unvalidated: a
        password is allowed here because it came from the environment (the command line's is
        refused in parse_state), while the stack file's validator refuses any."""
        from aidc.spec import State

        if self.backend == "sqlite":
            return State()
        return State.model_construct(backend=self.backend, dsn=self.location, dsn_file=None, dsn_env=None)


def parse_state(value: str, from_command_line: bool = True, flag: str = "--state") -> StateLocation:
    """`sqlite:PATH`, `postgres:DSN`, a bare `postgresql://...` URI or `host=...` key/value DSN
    (PostgreSQL), or a bare PATH (SQLite). A DSN with a password on the command line is refused:
    the process list and shell history show it."""
    import re

    scheme, colon, rest = value.partition(":")
    if colon and scheme == "sqlite":
        backend, location = "sqlite", rest
    elif colon and scheme in ("postgres", "postgresql") and not rest.startswith("//"):
        backend, location = "postgres", rest
    elif re.match(r"^postgres(ql)?://", value) or re.match(r"^\s*\w+\s*=", value):
        backend, location = "postgres", value
    else:
        backend, location = "sqlite", value
    if not location.strip():
        raise typer.BadParameter(f"{value!r} names no {'file' if backend == 'sqlite' else 'database'}: "
                                 "sqlite:PATH or postgres:DSN", param_hint=flag)
    state = StateLocation(backend, location)
    if from_command_line:
        refuse_password(state, flag)
    return state


def refuse_password(state: StateLocation, flag: str = "--state") -> None:
    from aidc.spec import dsn_has_password

    if state.backend == "postgres" and dsn_has_password(state.location):
        raise typer.BadParameter(f"a DSN with a password is refused on the command line (ps and shell "
                                 f"history show it): set {STATE_ENV}, or use the stack's state.dsn_env or "
                                 "state.dsn_file, PGPASSWORD or ~/.pgpass", param_hint=flag)


def _parse_state_text(value):
    # The parser only reads the form; _state_callback, which knows where the value came from,
    # refuses a password given on the command line.
    return value if isinstance(value, StateLocation) else parse_state(value, from_command_line=False)


def _state_callback(ctx: typer.Context, param: typer.CallbackParam, value):
    if value is None:
        return None
    source = ctx.get_parameter_source(param.name)
    if source is None or source.name != "ENVIRONMENT":
        refuse_password(value)
    return value


def state_option(help: str | None = None):
    """--state LOCATION (or AIDC_STATE): the state database, overriding the stack's `state:`."""
    text = ("Where the state is, overriding the stack's `state:`: postgres:DSN (or a bare postgresql:// "
            "or host=... DSN), or sqlite:PATH (or a bare PATH). No password on the command line: "
            f"{STATE_ENV}, the stack's dsn_env/dsn_file, PGPASSWORD or ~/.pgpass.")
    return typer.Option(None, "--state", envvar=STATE_ENV, show_envvar=True, metavar="LOCATION",
                        parser=_parse_state_text, callback=_state_callback,
                        help=(help + " " + text) if help else text)


def with_state(spec, state: StateLocation | None):
    """The stack `spec` with its `state:` replaced by `--state` when one was given."""
    if state is None:
        return spec
    return spec.model_copy(update={"state": state.spec_state()})


def sqlite_path(state: StateLocation | None, default: Path) -> Path:
    """The SQLite file a command opens: --state's when it names one, else `default`."""
    return Path(state.location) if state is not None and state.backend == "sqlite" else default
