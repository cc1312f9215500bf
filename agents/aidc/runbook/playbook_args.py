"""Do a runbook's playbook steps pass exactly what their playbooks declare?

A remediation playbook declares its arguments in a first task,
`ansible.builtin.validate_argument_spec` with an inline `argument_spec` (a role declares them in
`meta/argument_specs.yml`). Ansible itself never complains about a variable nobody reads, so a
runbook passing `path` to a playbook that reads `checkpoint_dir` pruned the playbook's default
directory instead of the one the approver saw. This module compares the two statically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from aidc.runbook.catalog import WHOLE_VARIABLE, Runbook, Step

VALIDATE_ACTIONS = ("ansible.builtin.validate_argument_spec", "validate_argument_spec")

# Which Ansible argument types can hold a value of each runbook parameter type.
PARAM_TO_ANSIBLE = {
    "int": {"int", "raw"},
    "enum": {"str", "raw"},
    "netdev": {"str", "raw"},
    "rdma_device": {"str", "raw"},
    "node": {"str", "raw"},
    "pci_bus_id": {"str", "raw"},
    "path": {"path", "str", "raw"},
}
# ... and of each literal a runbook writes into extravars (bool before int: bool is an int).
LITERAL_TO_ANSIBLE = ((bool, {"bool", "raw"}), (int, {"int", "raw"}), (float, {"float", "raw"}),
                      (str, {"str", "path", "raw"}), (list, {"list", "raw"}), (dict, {"dict", "raw"}))


# What can be wrong with one variable a step passes (or fails to pass).
UNKNOWN, MISSING, MISTYPED, OUTSIDE_CHOICES = "unknown", "missing", "mistyped", "outside_choices"


@dataclass(frozen=True)
class Mismatch:
    """One variable of one playbook step that does not fit the playbook's declaration.

    variable and kind are what a program (or a test) compares; str() is the message for a person.
    """

    runbook: str
    step: str
    playbook: str
    variable: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.runbook}/{self.step} -> {self.playbook}: {self.detail}"


class PlaybookArgsError(Exception):
    """A playbook has no argument declaration this module can read."""


def playbook_argument_spec(path: Path) -> dict:
    """The inline argument_spec of the playbook's first task in every play (merged)."""
    plays = yaml.safe_load(path.read_text())
    if not isinstance(plays, list) or not plays:
        raise PlaybookArgsError(f"{path}: not a playbook")
    spec: dict = {}
    for play in plays:
        tasks = (play.get("pre_tasks") or []) + (play.get("tasks") or [])
        first = tasks[0] if tasks else {}
        action = next((a for a in VALIDATE_ACTIONS if a in first), None)
        if action is None:
            raise PlaybookArgsError(f"{path}: play {play.get('name')!r} does not start with "
                                    "ansible.builtin.validate_argument_spec")
        spec.update((first[action] or {}).get("argument_spec") or {})
    return spec


def _compatible(ansible_type: str, value, params: dict) -> str | None:
    m = WHOLE_VARIABLE.fullmatch(value) if isinstance(value, str) else None
    if m:
        param = params.get(m.group(1))
        if param is None:
            return f"${{{m.group(1)}}} is not a declared param"
        ok = PARAM_TO_ANSIBLE.get(param["type"], set())
        what = f"param {m.group(1)!r} ({param['type']})"
    else:
        ok = next((types for py, types in LITERAL_TO_ANSIBLE if isinstance(value, py)), set())
        what = f"literal {value!r}"
    return None if ansible_type in ok else f"{what} cannot be type {ansible_type}"


def _choices_fit(choices: list, value, params: dict) -> str | None:
    m = WHOLE_VARIABLE.fullmatch(value) if isinstance(value, str) else None
    if m:
        param = params.get(m.group(1)) or {}
        values = param.get("values") if param.get("type") == "enum" else None
        if values is None or not set(values) <= set(choices):
            return f"param {m.group(1)!r} may hold values outside the playbook's choices {choices}"
        return None
    return None if value in choices else f"{value!r} is not one of the playbook's choices {choices}"


def step_mismatches(runbook: Runbook, step: Step, spec: dict) -> list[Mismatch]:
    """Why the variables a playbook step passes do not fit the playbook's declared arguments."""
    passed = step.raw.get("extravars") or {}
    out: list[tuple[str, str, str]] = []
    for name in sorted(set(passed) - set(spec)):
        out.append((name, UNKNOWN, f"passes {name!r}, which the playbook does not declare (it declares: "
                                   f"{', '.join(sorted(spec)) or 'nothing'})"))
    for name in sorted(n for n, arg in spec.items() if (arg or {}).get("required") and n not in passed):
        out.append((name, MISSING, f"does not pass {name!r}, which the playbook requires"))
    for name in sorted(set(passed) & set(spec)):
        arg = spec[name] or {}
        problem, kind = _compatible(arg.get("type", "str"), passed[name], runbook.params), MISTYPED
        if problem is None and arg.get("choices"):
            problem, kind = _choices_fit(arg["choices"], passed[name], runbook.params), OUTSIDE_CHOICES
        if problem:
            out.append((name, kind, f"{name}: {problem}"))
    return [Mismatch(runbook.name, step.id, step.raw["playbook"], name, kind, detail) for name, kind, detail in out]
