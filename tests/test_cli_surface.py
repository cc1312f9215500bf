"""The CLI as a whole: every command explains itself, and every command that reports can
answer a machine (`--json`). Long-running services report through their logs instead."""

from __future__ import annotations

import pytest
import typer
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
        result = CliRunner().invoke(app, [*path, "-h"])  # -h as well as --help, on every command
        assert result.exit_code == 0 and "Usage" in result.output, f"`aidc {' '.join(path)} -h` exited {result.exit_code}"


def test_every_reporting_command_offers_json():
    missing = [" ".join(path) for path, command in leaf_commands()
               if path not in SERVICES and "--json" not in {o for p in command.params for o in getattr(p, "opts", [])}]
    assert missing == [], f"commands without --json: {missing}"


# ---- one vocabulary (aidc.cli.options): every command spells the shared concepts the same way ----

from aidc.cli import options  # noqa: E402

# The fixed sets and where their names come from: a new scheduler or device backend appears in
# the CLI by registering, not by editing each command.
FIXED_SETS = {
    "--backend": lambda: options.DEVICE_BACKENDS,
    "--dcgm-exporter": lambda: options.DCGM_EXPORTER,
    "--log-format": lambda: options.LOG_FORMATS,
}
LAB_COMMANDS = {"lab"}  # the group whose state directory defaults to the lab's


def every_option():
    for path, command in leaf_commands():
        for param in command.params:
            for name in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())):
                yield path, name, param


# --lab-dir stays where it names the lab's keyring (not a state directory): kms, certificate export.
LAB_KEYRING = {"burnin certificate"}
# `aidc inventory` is an Ansible dynamic inventory script: --list and --host NAME are Ansible's protocol.
ANSIBLE_PROTOCOL = {(("inventory",), "--host")}


def test_no_command_declares_an_old_spelling():
    """Old spellings are accepted only through the deprecation path, never declared again."""
    declared = sorted({(" ".join(path), name) for path, name, _ in every_option() if name in options.DEPRECATED
                       and not (name == "--lab-dir" and (path[0] == "kms" or " ".join(path[:2]) in LAB_KEYRING))
                       and (path, name) not in ANSIBLE_PROTOCOL})
    assert declared == []


def test_every_fixed_set_is_a_choice_from_its_registry():
    from aidc.device.base import open_backend
    from aidc.errors import DeviceError
    from aidc.failover.backends import BACKENDS

    seen = set()
    for path, name, param in every_option():
        if name == "--scheduler":
            assert set(options.choices_of(param)) <= set(BACKENDS), path
            seen.add(name)
        elif name in FIXED_SETS:
            assert options.choices_of(param) == tuple(FIXED_SETS[name]()), f"aidc {' '.join(path)} {name}"
            seen.add(name)
    assert seen == {"--scheduler", *FIXED_SETS}
    # the device names the CLI offers are exactly the ones open_backend knows
    for name in options.DEVICE_BACKENDS:
        try:
            open_backend(name, **({"node_dir": "/nonexistent"} if name == "sim" else {})).close()
        except DeviceError as exc:
            assert "unknown" not in str(exc).lower(), exc
        except Exception:  # noqa: BLE001 - no driver here; the name was still accepted
            pass


def test_state_dir_and_stack_read_the_environment_and_only_the_lab_defaults():
    for path, name, param in every_option():
        where = f"aidc {' '.join(path)} {name}"
        if name == "--state-dir":
            assert param.envvar == "AIDC_STATE_DIR", where
            lab_default = path[0] in LAB_COMMANDS or path[:2] == ("burnin", "baseline")
            assert (param.default is None) != lab_default, f"{where}: defaults to {param.default}"
        if name == "--stack":
            assert param.envvar == "AIDC_STACK", where


def test_listen_addresses_take_one_form():
    listening = [(path, param) for path, name, param in every_option() if name == "--listen-address"]
    assert {path for path, _ in listening} >= {("agent", "run"), ("failover", "run"), ("runbook", "serve"),
                                                 ("goodput", "serve")}
    for path, param in listening:
        assert param.metavar == "HOST:PORT", path
    assert options.parse_listen("0.0.0.0:9400", 1) == ("0.0.0.0", 9400)
    assert options.parse_listen("[::1]:9097", 1) == ("::1", 9097)
    assert options.parse_listen("127.0.0.1", 9400) == ("127.0.0.1", 9400)
    for bad in ("gpu-1:9400", "127.0.0.1:99999", "127.0.0.1:x"):
        with pytest.raises(typer.BadParameter):
            options.parse_listen(bad, 9400)


@pytest.mark.parametrize("old,new", [
    (["runbook", "approve", "7", "--by", "Ann"], ["runbook", "approve", "7", "--actor", "Ann"]),
    (["failover", "status", "--lab-dir", "x"], ["failover", "status", "--state-dir", "x", "--stack", "lab"]),
    (["failover", "status", "--lab-dir", "x", "-s", "prod"], ["failover", "status", "--state-dir", "x", "-s", "prod"]),
    (["failover", "run", "--poll=0.1"], ["failover", "run", "--poll-interval=0.1"]),
    (["audit", "verify", "--db", "a.db"], ["audit", "verify", "--audit-db", "a.db"]),
    (["runbook", "serve", "--host", "0.0.0.0", "--port", "0"], ["runbook", "serve", "--listen-address", "0.0.0.0:0"]),
    (["agent", "run", "--port", "9500"], ["agent", "run", "--listen-address", "127.0.0.1:9500"]),
    (["failover", "run", "--listen-address", "::", "--metrics-port", "9101"],
     ["failover", "run", "--listen-address", "[::]:9101"]),
    (["failover", "run", "--listen", "0.0.0.0:8443"], ["failover", "run", "--ingest-address", "0.0.0.0:8443"]),
    (["kms", "status", "--lab-dir", "x"], ["kms", "status", "--lab-dir", "x"]),  # kms: the lab's keyring, kept
    (["audit", "show", "--dsn", "host=/run/pg"], ["audit", "show", "--state", "host=/run/pg"]),
    (["runbook", "runs", "--state-db", "r.db"], ["runbook", "runs", "--state", "r.db"]),
])
def test_old_spellings_are_rewritten_with_one_warning_each(old, new):
    import typer.main
    from typer import _click

    root = typer.main.get_command(app)
    warnings = []
    leaf = options._leaf(root, _click.Context(root), old)
    assert options.rewrite_deprecated(leaf, old, warnings.append) == new
    renamed = [w for w in old if w.partition("=")[0] in options.DEPRECATED and w not in new]
    assert len(warnings) == len(set(w.partition("=")[0] for w in renamed))
    assert all(w.startswith("aidc: warning: --") and "deprecated" in w for w in warnings)


@pytest.mark.slow
def test_an_old_spelling_still_runs_and_says_so_on_stderr(tmp_path, monkeypatch):
    """End to end through the real entry point: `--db` (old) reads the same audit log as `--audit-db`."""
    import subprocess
    import sys

    from aidc.audit import AuditLog

    db = tmp_path / "audit.db"
    with AuditLog(db) as log:
        log.append("note", "vocabulary test", actor="test")
    monkeypatch.delenv("AIDC_DEPRECATION_WARNINGS")  # conftest quiets them for the older tests
    run = [sys.executable, "-m", "aidc", "audit", "verify", "--json"]
    old = subprocess.run([*run, "--db", str(db)], capture_output=True, text=True, timeout=60)
    new = subprocess.run([*run, "--audit-db", str(db)], capture_output=True, text=True, timeout=60)
    assert old.returncode == new.returncode == 0, old.stderr
    assert old.stdout == new.stdout
    assert old.stderr.strip().splitlines() == [options.deprecation_line("--db", "--audit-db")]
    assert new.stderr == ""


def test_production_commands_never_fall_back_to_the_lab(tmp_path):
    from aidc.errors import AidcError

    assert options.resolve_stack_and_state_dir(None, None) == ("lab", options.LAB_STATE_DIR)
    with pytest.raises(AidcError, match="--state-dir is required"):
        options.resolve_stack_and_state_dir("h100-example", None)
    with pytest.raises(AidcError, match="--stack is required"):
        options.resolve_stack_and_state_dir(None, tmp_path)
    (tmp_path / "nodes").mkdir()
    assert options.resolve_stack_and_state_dir(None, tmp_path) == ("lab", tmp_path)
    assert options.resolve_stack_and_state_dir("h100-example", tmp_path) == ("h100-example", tmp_path)
    lab_file = str(tmp_path / "Pulumi.lab.yaml")  # the lab stack named by its file is still the lab
    assert options.resolve_stack_and_state_dir(lab_file, None) == (lab_file, options.LAB_STATE_DIR)


def test_deprecation_lines_can_be_silenced_for_scripts(monkeypatch, capsys):
    import typer.main
    from typer import _click

    root = typer.main.get_command(app)
    args = ["runbook", "approve", "7", "--by", "Ann"]
    leaf = options._leaf(root, _click.Context(root), args)
    monkeypatch.setenv("AIDC_DEPRECATION_WARNINGS", "off")
    assert options.rewrite_deprecated(leaf, args)[-2:] == ["--actor", "Ann"]
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("AIDC_DEPRECATION_WARNINGS")
    options.rewrite_deprecated(leaf, args)
    assert capsys.readouterr().err == options.deprecation_line("--by", "--actor") + "\n"


# The commands that open the event store, the run state or the audit log.
STATE_COMMANDS = {("failover", "run"), ("failover", "status"), ("failover", "release"),
                  ("failover", "breaker", "status"), ("failover", "breaker", "reset"), ("failover", "offender", "list"),
                  ("failover", "offender", "clear"), ("runbook", "run"), ("runbook", "approve"), ("runbook", "runs"),
                  ("runbook", "serve"), ("audit", "verify"), ("audit", "show"), ("audit", "report"),
                  ("audit", "reanchor")}


def test_one_state_flag_on_every_command_that_opens_the_state():
    taking = {path: param for path, name, param in every_option() if name == "--state"}
    assert set(taking) >= STATE_COMMANDS
    for path, param in taking.items():
        assert param.envvar == options.STATE_ENV and param.metavar == "LOCATION", path


@pytest.mark.parametrize("text,backend,location", [
    ("sqlite:/var/lib/aidc/state.db", "sqlite", "/var/lib/aidc/state.db"),
    ("/var/lib/aidc/state.db", "sqlite", "/var/lib/aidc/state.db"),  # a bare path is SQLite
    ("postgres:host=db1 dbname=aidc", "postgres", "host=db1 dbname=aidc"),
    ("postgresql://aidc@db1/aidc", "postgres", "postgresql://aidc@db1/aidc"),
    ("postgres:postgresql://aidc@db1/aidc", "postgres", "postgresql://aidc@db1/aidc"),
    ("host=/run/postgresql dbname=aidc", "postgres", "host=/run/postgresql dbname=aidc"),
])
def test_the_state_flag_names_a_sqlite_file_or_a_postgres_dsn(text, backend, location):
    state = options.parse_state(text)
    assert (state.backend, state.location) == (backend, location)
    spec_state = state.spec_state()
    assert spec_state.backend == backend and spec_state.dsn == (location if backend == "postgres" else None)


def test_a_dsn_with_a_password_is_refused_on_the_command_line_but_not_from_the_environment():
    for secret in ("postgresql://aidc:hunter2@db1/aidc", "host=db1 password=hunter2"):
        with pytest.raises(typer.BadParameter, match="AIDC_STATE"):
            options.parse_state(secret)
        assert options.parse_state(secret, from_command_line=False).location == secret
        shown = options.parse_state(secret, from_command_line=False)  # --print-config prints str()
        assert "hunter2" not in repr(shown) and "hunter2" not in str(shown) and str(shown).startswith("postgres:")
    assert str(options.parse_state("/var/lib/aidc/state.db")) == "sqlite:/var/lib/aidc/state.db"
    with pytest.raises(typer.BadParameter, match="names no"):
        options.parse_state("sqlite:")


def test_the_password_check_knows_where_the_value_came_from(monkeypatch, tmp_path):
    secret = "postgresql://aidc:hunter2@127.0.0.1:1/aidc"
    import re

    def said(result) -> str:  # the error box's text, unwrapped
        return re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)

    refused = CliRunner().invoke(app, ["audit", "show", "--state", secret])
    assert refused.exit_code == 2 and "password is refused on the command line" in said(refused)
    monkeypatch.setenv(options.STATE_ENV, secret)
    accepted = CliRunner().invoke(app, ["audit", "show", "--state-dir", str(tmp_path)])
    assert accepted.exit_code != 0 and "refused" not in said(accepted)  # past the check, to no server
    assert "cannot reach the state database" in str(accepted.exception or "") + said(accepted)
    assert "hunter2" not in said(accepted)


def test_the_state_flag_overrides_the_stacks_state_section():
    from aidc.spec import load_stack

    spec = load_stack("lab")
    assert options.with_state(spec, None) is spec
    moved = options.with_state(spec, options.parse_state("postgres:host=/run/pg dbname=aidc"))
    assert (moved.state.backend, moved.state.dsn) == ("postgres", "host=/run/pg dbname=aidc")
    assert spec.state.backend == "sqlite"  # the loaded stack is not changed
