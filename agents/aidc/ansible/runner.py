"""A small facade over ansible-runner: run one playbook, stream its events, summarise the result.

Why a facade: callers (the converge tests, the runbook engine) want "did it work, what changed,
on which host" and a live event stream, not ansible-runner's directory layout. The facade also
closes the traps measured here: runner saves `cmdline`/`extravars` under the private data dir and
silently reuses them (so every run gets its own temporary private data dir and
`suppress_env_files=True`), ansible-playbook must be on PATH (the running interpreter's bin dir
is put first), and the ssh control masters Ansible leaves behind are told to exit after the run
(their sockets live in the run's own temporary directory).

Extra variables are data, never templates: Ansible templates every string it is given, so a
value like `0 {{ lookup('pipe', ...) }}` (from an alert label, say) would run a command. They are
written to a YAML file in the run's directory with every string tagged `!unsafe` and passed as
`-e @file`; ansible-runner's own `extravars` (a JSON `-e` string, templated) is not used.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aidc.errors import AidcError
from aidc.files import write_atomic
from aidc.shipped import installed_root

# The checkout's playbooks, or the copy an installed wheel carries (aidc.shipped).
PLAYBOOK_DIR = installed_root() / "playbooks"
SITE_PLAYBOOK = PLAYBOOK_DIR / "site.yml"

EventCallback = Callable[[dict[str, Any]], None]

# Ansible variable names: a letter or underscore, then letters, digits, underscores.
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class AnsibleRunError(AidcError):
    """ansible-runner could not start the playbook at all (not: a task failed)."""


@dataclass(frozen=True)
class TaskOutcome:
    """One task's result on one host (changed, failed or skipped)."""

    host: str
    task: str
    role: str | None
    action: str | None
    # The failure message. Skip events carry no condition (ansible-runner sends no result for
    # them): site.yml's preflight report says why each concern is skipped.
    detail: str = ""

    def label(self) -> str:
        where = f"{self.role} : " if self.role else ""
        return f"{self.host}: {where}{self.task}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class HostCounts:
    """Ansible's recap for one host. `ok` counts changed tasks too, as Ansible does."""

    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: int = 0


@dataclass
class PlaybookResult:
    """What a playbook run did: status, per-host counts, and the tasks that changed/failed/skipped."""

    status: str  # ansible-runner's: successful, failed, timeout, canceled
    rc: int
    hosts: dict[str, HostCounts] = field(default_factory=dict)
    changed_tasks: list[TaskOutcome] = field(default_factory=list)
    failed_tasks: list[TaskOutcome] = field(default_factory=list)
    skipped_tasks: list[TaskOutcome] = field(default_factory=list)
    stdout: str = ""

    @property
    def ok(self) -> bool:
        """True when the run finished, reached at least one host, and no task failed.

        A run that matched no host exits 0 in Ansible; here it is not ok, so a typo in a limit or
        an empty inventory can never pass for a clean (or an idempotent) run.
        """
        # Judged on Ansible's own recap: a task that failed inside a block and was handled by its
        # `rescue:` is not a failure there (the run succeeded), though its event was "failed".
        return (self.rc == 0 and bool(self.hosts)
                and not any(h.failed or h.unreachable for h in self.hosts.values()))

    @property
    def changed(self) -> int:
        return sum(h.changed for h in self.hosts.values())

    def describe(self) -> str:
        """A short human summary (recap line per host, then changed and failed tasks)."""
        lines = [f"{h}: ok={c.ok} changed={c.changed} failed={c.failed} skipped={c.skipped} "
                 f"unreachable={c.unreachable}" for h, c in sorted(self.hosts.items())]
        lines += ["changed: " + t.label() for t in self.changed_tasks]
        lines += ["FAILED: " + t.label() for t in self.failed_tasks]
        return "\n".join(lines)


def _outcome(event: Mapping[str, Any]) -> TaskOutcome:
    data = event.get("event_data", {})
    res = data.get("res") or {}
    detail = ""
    if event.get("event") == "runner_on_failed":
        detail = str(res.get("msg") or res.get("stderr") or "")[:500]
    return TaskOutcome(host=str(data.get("host", "")), task=str(data.get("task", "")),
                       role=data.get("role") or None, action=data.get("task_action") or None, detail=detail)


def _close_control_masters(control_dir: Path) -> None:
    """Ask every ssh control master of this run to exit (they outlive ansible-playbook otherwise)."""
    ssh = shutil.which("ssh")
    if not ssh or not control_dir.is_dir():
        return
    for sock in control_dir.iterdir():
        subprocess.run([ssh, "-o", f"ControlPath={sock}", "-O", "exit", "aidc-control-master"],
                       capture_output=True, timeout=10, check=False)


class _UnsafeDumper(yaml.SafeDumper):
    """YAML whose every string value carries Ansible's `!unsafe` tag (never templated)."""


def _represent_unsafe_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("!unsafe", value, style="'")


def _represent_plain_keys(dumper: yaml.SafeDumper, value: dict) -> yaml.Node:
    # Keys stay plain strings (variable names); only values are data to protect.
    pairs = [(yaml.ScalarNode("tag:yaml.org,2002:str", str(k)), dumper.represent_data(v)) for k, v in value.items()]
    return yaml.MappingNode("tag:yaml.org,2002:map", pairs)


_UnsafeDumper.add_representer(str, _represent_unsafe_str)
_UnsafeDumper.add_representer(dict, _represent_plain_keys)


def write_unsafe_extravars(extravars: Mapping[str, Any], path: Path) -> Path:
    """Write extra variables for `-e @path`, every string (nested too) tagged `!unsafe`."""
    bad = [k for k in extravars if not isinstance(k, str) or not _VAR_NAME.fullmatch(k)]
    if bad:
        raise AnsibleRunError(f"extra variable names must be Ansible variable names, got {bad!r}")
    try:
        text = yaml.dump(dict(extravars), Dumper=_UnsafeDumper, default_flow_style=False)
    except yaml.representer.RepresenterError as exc:
        raise AnsibleRunError(f"extra variables must be plain data (text, numbers, lists, maps): {exc}") from None
    write_atomic(path, text)  # private: the values come from alerts and people
    return path


def run_playbook(
    playbook: str | os.PathLike = SITE_PLAYBOOK,
    *,
    inventory: str | os.PathLike | Mapping[str, Any],
    extravars: Mapping[str, Any] | None = None,
    limit: str | None = None,
    tags: Sequence[str] = (),
    skip_tags: Sequence[str] = (),
    check: bool = False,
    diff: bool = False,
    on_event: EventCallback | None = None,
    envvars: Mapping[str, str] | None = None,
    forks: int | None = None,
    timeout_s: int | None = None,
) -> PlaybookResult:
    """Run `playbook` against `inventory` and return what it did.

    inventory: a path (static file, directory, or an executable dynamic-inventory script such as
        `playbooks/inventory/aidc_spec.sh`) or an inventory as a dict (Ansible's YAML/JSON shape).
    extravars: passed with `-e @file` (highest precedence), strings as unsafe text (never
        templated), never saved for later runs.
    limit / tags / skip_tags: as ansible-playbook's --limit, --tags, --skip-tags.
    check / diff: --check / --diff (a dry run that shows what would change).
    on_event: called with every ansible-runner event dict as it arrives (`event`,
        `event_data`, `stdout`, ...), e.g. to stream progress or write an audit trail.
    envvars: extra environment for ansible-playbook (ANSIBLE_* settings).
    timeout_s: stop the run after this many seconds (status "timeout").

    Raises AnsibleRunError when the run cannot start (no playbook, no ansible-playbook);
    a failing task is not an exception: see `PlaybookResult.ok` and `.failed_tasks`.
    """
    import ansible_runner  # heavy import: only when a playbook actually runs

    playbook = Path(playbook).resolve()
    if not playbook.is_file():
        raise AnsibleRunError(f"{playbook}: no such playbook")
    bin_dir = str(Path(sys.executable).parent)
    if not shutil.which("ansible-playbook", path=bin_dir + os.pathsep + os.environ.get("PATH", "")):
        raise AnsibleRunError("ansible-playbook not found: install ansible-core (requirements.lock)")

    result = PlaybookResult(status="unknown", rc=-1)
    counts: dict[str, HostCounts] = {}
    stdout: list[str] = []
    stats: dict[str, Any] = {}

    def handle(event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        if event.get("stdout"):
            stdout.append(event["stdout"])
        data = event.get("event_data", {})
        reported_changed = bool((data.get("res") or {}).get("changed"))
        if kind == "runner_on_ok" and reported_changed:
            result.changed_tasks.append(_outcome(event))
        elif kind == "runner_on_failed":
            # A failure with ignore_errors that reports a change is counted in the recap's
            # `changed` (and as ok): list it, so the task lists match the counts.
            if not data.get("ignore_errors"):
                result.failed_tasks.append(_outcome(event))
            elif reported_changed:
                result.changed_tasks.append(_outcome(event))
        elif kind == "runner_on_unreachable":
            result.failed_tasks.append(_outcome(event))
        elif kind == "runner_on_skipped":
            result.skipped_tasks.append(_outcome(event))
        elif kind == "playbook_on_stats":
            stats.update(event.get("event_data", {}))
        if on_event is not None:
            on_event(event)
        return False  # nothing is kept on disk: the summary is built here, the directory is deleted

    with tempfile.TemporaryDirectory(prefix="aidc-ansible-run-") as private:
        control_dir = Path(private) / "cp"
        control_dir.mkdir()
        env = {
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            # Controller-side state stays inside this run's temporary directory.
            "ANSIBLE_HOME": str(Path(private) / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(Path(private) / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOLOR": "1",
            **dict(envvars or {}),
        }
        args = [flag for flag, on in (("--check", check), ("--diff", diff)) if on]
        if extravars:
            args += ["-e", "@" + str(write_unsafe_extravars(extravars, Path(private) / "aidc-extravars.yml"))]
        cmdline = " ".join(shlex.quote(a) for a in args)
        inv: Any = dict(inventory) if isinstance(inventory, Mapping) else str(Path(inventory).resolve())
        try:
            runner = ansible_runner.run(
                private_data_dir=private,
                playbook=str(playbook),
                inventory=inv,
                limit=limit,
                tags=",".join(tags) or None,
                skip_tags=",".join(skip_tags) or None,
                cmdline=cmdline or None,
                envvars=env,
                forks=forks,
                timeout=timeout_s,
                event_handler=handle,
                suppress_env_files=True,
                quiet=True,
            )
        finally:
            _close_control_masters(control_dir)
        result.status, result.rc = runner.status, runner.rc
        for key, attr in (("ok", "ok"), ("changed", "changed"), ("failures", "failed"),
                          ("skipped", "skipped"), ("dark", "unreachable")):
            for host, n in (stats.get(key) or {}).items():  # "changed" is {} when nothing changed
                setattr(counts.setdefault(host, HostCounts()), attr, n)
        for key in ("processed", "ok"):
            for host in stats.get(key) or {}:
                counts.setdefault(host, HostCounts())
    # A host whose recap shows rescued blocks and no failures had every failed task rescued:
    # those are handled, not failures (Ansible's own recap does not count them as failed).
    rescued = {h for h, n in (stats.get("rescued") or {}).items()
               if n and h in counts and not counts[h].failed}
    result.failed_tasks = [t for t in result.failed_tasks if t.host not in rescued]
    result.hosts = counts
    result.stdout = "".join(s + "\n" for s in stdout)
    return result
