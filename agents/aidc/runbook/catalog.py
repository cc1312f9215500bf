"""Runbooks as data: load `runbooks/*.yaml`, validate them against `runbooks/schema.json`,
and match an incoming alert (or fault class) to the runbook that handles it.

A runbook that fails validation is an error naming the file and the key path, never a
half-loaded catalog: an on-call tool that silently skips a broken runbook is worse than
one that refuses to start.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from string import Template

import jsonschema
import yaml

from aidc.errors import AidcError
from aidc.runbook.params import BUILTIN_VARIABLES
from aidc.shipped import project_file
from aidc.spec import project_root

# Kinds that change a node. Such a step runs only after an approved `approve` step, or when
# the cluster policy lists its kind in `policy.runbook_auto_approve`.
DESTRUCTIVE_KINDS = frozenset({"quarantine", "release", "playbook", "burnin"})
DEFAULT_NODE_LABEL = "Hostname"
DEFAULT_STEP_TIMEOUT_S = 600.0
DEFAULT_RUN_TIMEOUT_S = 6 * 3600.0
DEFAULT_COOLDOWN_S = 3600.0


class RunbookError(AidcError):
    """A runbook file is missing, unreadable or does not follow the schema."""


def runbooks_dir() -> Path:
    """$AIDC_RUNBOOKS, else `runbooks/` in the project root, else the installed package's."""
    env = os.environ.get("AIDC_RUNBOOKS")
    return Path(env) if env else project_file("runbooks", project_root())


def schema_path() -> Path:
    # The schema ships beside the runbooks in the checkout; a custom runbook directory
    # without its own schema is validated against the project's.
    local = runbooks_dir() / "schema.json"
    return local if local.exists() else project_file("runbooks/schema.json", project_root())


@lru_cache(maxsize=4)
def _validator(path: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(Path(path).read_text())
    return jsonschema.Draft202012Validator(schema)


@dataclass(frozen=True)
class Step:
    id: str
    kind: str
    raw: dict

    @property
    def destructive(self) -> bool:
        if self.kind == "playbook":
            return bool(self.raw.get("destructive", True))
        return self.kind in DESTRUCTIVE_KINDS

    @property
    def timeout_s(self) -> float:
        return float(self.raw.get("timeout_s", DEFAULT_STEP_TIMEOUT_S))

    @property
    def on_failure(self) -> str:
        return self.raw.get("on_failure", "abort")

    @property
    def description(self) -> str:
        return self.raw.get("description", "")


@dataclass(frozen=True)
class Runbook:
    name: str
    title: str
    summary: str
    trigger: dict
    steps: tuple[Step, ...]
    on_failure: tuple[Step, ...] = ()
    guards: tuple[dict, ...] = ()
    timeout_s: float = DEFAULT_RUN_TIMEOUT_S
    cooldown_s: float = DEFAULT_COOLDOWN_S
    params: dict = field(default_factory=dict)  # name -> declared type (aidc.runbook.params)
    path: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def node_label(self) -> str:
        return self.trigger.get("node_label", DEFAULT_NODE_LABEL)

    def matches_alert(self, labels: dict) -> bool:
        for want in self.trigger.get("alerts", []):
            if labels.get("alertname") == want["alertname"] and all(
                    labels.get(k) == v for k, v in want.get("labels", {}).items()):
                return True
        return False

    def matches_fault(self, kind: str | None) -> bool:
        return kind is not None and kind in self.trigger.get("faults", [])


def _steps(items: list[dict], prefix: str = "") -> tuple[Step, ...]:
    out = []
    for i, item in enumerate(items):
        out.append(Step(item.get("id", f"{prefix}{i + 1}"), item["kind"], item))
    return tuple(out)


def _error_path(err: jsonschema.ValidationError) -> str:
    out = ""
    for part in err.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top level)"


def parse_runbook(doc: object, file: str = "<memory>") -> Runbook:
    """Validate one runbook document; errors name the file, key path and what was wrong."""
    validator = _validator(str(schema_path()))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        path, message = _error_path(best), best.message
        kind = best.instance.get("kind") if isinstance(best.instance, dict) else None
        if best.validator == "oneOf" and kind in validator.schema["$defs"]:
            # "not valid under any of the given schemas" helps nobody: check the step
            # against the schema of the kind it claims to be, and report that.
            sub = validator.evolve(schema={"$defs": validator.schema["$defs"], "$ref": f"#/$defs/{kind}"})
            inner = jsonschema.exceptions.best_match(sub.iter_errors(best.instance))
            if inner is not None:
                path = path + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inner.absolute_path)
                message = f"{kind} step: {inner.message}"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise RunbookError(f"{file}: {path}: {message}{more}")
    assert isinstance(doc, dict)
    ids = [s.get("id") for s in doc["steps"] + doc.get("on_failure", []) if s.get("id")]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise RunbookError(f"{file}: steps: step ids must be unique, repeated: {', '.join(dupes)}")
    _check_variables(doc, file)
    _check_burnin_tests(doc, file)
    return Runbook(
        name=doc["name"], title=doc["title"], summary=doc["summary"], trigger=doc["trigger"],
        steps=_steps(doc["steps"]), on_failure=_steps(doc.get("on_failure", []), "on-failure-"),
        guards=tuple(doc.get("guards", [])), timeout_s=float(doc.get("timeout_s", DEFAULT_RUN_TIMEOUT_S)),
        cooldown_s=float(doc.get("cooldown_s", DEFAULT_COOLDOWN_S)), params=dict(doc.get("params", {})),
        path=file, raw=doc,
    )


WHOLE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _references(value, where: str):
    """(key path, variable name) for every ${name} / $name in the strings of a step."""
    if isinstance(value, str):
        for name in Template(value).get_identifiers():
            yield where, name
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _references(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _references(v, f"{where}[{i}]")


def _check_variables(doc: dict, file: str) -> None:
    """Every variable a step uses is a builtin or a declared param; a playbook gets only whole,
    required params (typed, never pasted into a larger string)."""
    params = doc.get("params", {})
    for name, spec in params.items():
        if spec["type"] == "int" and spec["min"] > spec["max"]:
            raise RunbookError(f"{file}: params.{name}: min {spec['min']} is above max {spec['max']}")
    for phase in ("steps", "on_failure"):
        for i, step in enumerate(doc.get(phase, [])):
            for where, name in _references(step, f"{phase}[{i}]"):
                if name not in params and name not in BUILTIN_VARIABLES:
                    raise RunbookError(f"{file}: {where}: ${{{name}}} is neither a declared param nor one of "
                                       f"{', '.join(sorted(BUILTIN_VARIABLES))}: declare it under params")
            for key, value in (step.get("extravars") or {}).items():
                where = f"{phase}[{i}].extravars.{key}"
                if not isinstance(value, str) or not Template(value).get_identifiers():
                    continue
                m = WHOLE_VARIABLE.fullmatch(value)
                if not m or m.group(1) not in params:
                    raise RunbookError(f"{file}: {where}: a playbook variable is a literal or one whole "
                                       f"\"${{param}}\" of a declared param, got {value!r}")
                if not params[m.group(1)].get("required", True):
                    raise RunbookError(f"{file}: {where}: param {m.group(1)!r} is optional; a playbook "
                                       "only gets required params")


def _check_burnin_tests(doc: dict, file: str) -> None:
    """A burn-in step lists burn-in tests there are (aidc.burnin.suite), whatever schema a custom
    runbook directory brings: an unknown one would otherwise be found only when a node waits for it."""
    from aidc.burnin.suite import select
    from aidc.errors import BurninError

    for i, step in enumerate(doc["steps"]):
        if step.get("kind") == "burnin":
            try:
                select(step.get("tests"))
            except BurninError as exc:
                raise RunbookError(f"{file}: steps[{i}].tests: {exc}") from None


def load_runbook(path: str | Path) -> Runbook:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RunbookError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "-"
        raise RunbookError(f"{path}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    rb = parse_runbook(doc, str(path))
    if rb.name != path.stem:
        raise RunbookError(f"{path}: name: expected {path.stem!r} (the file name), got {rb.name!r}")
    return rb


class Catalog:
    """Every runbook in a directory, by name."""

    def __init__(self, runbooks: list[Runbook]):
        self.runbooks = {rb.name: rb for rb in runbooks}

    @classmethod
    def load(cls, directory: str | Path | None = None) -> "Catalog":
        directory = Path(directory) if directory else runbooks_dir()
        if not directory.is_dir():
            raise RunbookError(f"{directory}: no runbook directory here")
        return cls([load_runbook(p) for p in sorted(directory.glob("*.yaml"))])

    def names(self) -> list[str]:
        return sorted(self.runbooks)

    def get(self, name: str) -> Runbook:
        try:
            return self.runbooks[name]
        except KeyError:
            raise RunbookError(f"no runbook named {name!r}; known: {', '.join(self.names()) or 'none'}") from None

    def match(self, labels: dict) -> Runbook | None:
        """The runbook for an alert: an alertname match beats a fault-class (`kind` label) match."""
        for name in self.names():
            if self.runbooks[name].matches_alert(labels):
                return self.runbooks[name]
        for name in self.names():
            if self.runbooks[name].matches_fault(labels.get("kind")):
                return self.runbooks[name]
        return None


class _Variables(dict):
    # A variable the trigger did not supply (a hand-started run has no alert labels) shows
    # as `<name?>` instead of a raw `${name}` or an error.
    def __missing__(self, key: str) -> str:
        return f"<{key}?>"


def expand(value, variables: dict, typed: bool = False):
    """Fill `${node}`-style variables in strings, recursively (PromQL keeps its `{...}`).

    typed: a string that is one whole `${name}` becomes the variable's value itself (an int
    stays an int), as playbook variables need."""
    if isinstance(value, str):
        m = WHOLE_VARIABLE.fullmatch(value) if typed else None
        if m and m.group(1) in variables:
            return variables[m.group(1)]
        return Template(value).safe_substitute(_Variables(variables))
    if isinstance(value, dict):
        return {k: expand(v, variables, typed) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, variables, typed) for v in value]
    return value
