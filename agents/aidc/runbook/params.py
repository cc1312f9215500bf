"""Typed runbook parameters: every value that flows from an alert (labels, annotations) or a
person (`aidc runbook run --label`) into a step is declared in the runbook's `params:` with a
type from the small set below, and checked before the run's first step.

Why: a label value used to be pasted into step text and Ansible extra variables as it came.
Ansible templates strings, so `gpu="0 {{ lookup('pipe', ...) }}"` ran a command, and a shell-split
command line turned `gpu="0 --other-flag"` into extra program arguments. A declared type makes
the set of values a step can receive small and known; what does not fit fails the run, audited.

The types are versioned (PARAM_TYPES_VERSION): a type's meaning never changes within a
version; a stricter or looser rule is a new type or a new version, so a runbook reviewed under
one set of rules keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aidc.errors import AidcError

PARAM_TYPES_VERSION = 1

# Variables the engine supplies itself; a runbook cannot declare params with these names.
# `alertname` is the trigger's alert name (a runbook matched by fault class gets alerts of
# other names too), checked to be a Prometheus alert name.
BUILTIN_VARIABLES = frozenset({"node", "runbook", "run_id", "alertname"})

MAX_TEXT = 4096


# Why a value was refused: what a program (or a test) compares, where a person reads the message.
WRONG_TYPE, TOO_LONG, MALFORMED, OUT_OF_RANGE, NOT_A_CHOICE, NOT_UNDER, UNKNOWN_TYPE, MISSING, NOT_A_NODE = (
    "wrong_type", "too_long", "malformed", "out_of_range", "not_a_choice", "not_under", "unknown_type",
    "missing", "not_a_node")


@dataclass(frozen=True)
class ParamProblem:
    """One parameter that does not fit: its name, why (a kind above) and the one-line message."""

    name: str
    kind: str
    message: str


class ParamError(AidcError):
    """A value does not fit its declared parameter type (or a required one is missing).

    problems: every parameter refused, in order; str() joins their messages.
    """

    def __init__(self, *problems: ParamProblem):
        self.problems = problems
        super().__init__("; ".join(p.message for p in problems))


def _refused(name: str, kind: str, detail: str) -> ParamError:
    return ParamError(ParamProblem(name, kind, f"{name}: {detail}"))


# Linux IFNAMSIZ is 16 with the NUL: at most 15 characters. Stricter than the kernel (which
# allows almost any byte except '/', ':' and whitespace): no leading '-' or '.', so a name can
# never read as an option or a relative path.
_NETDEV = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
# RDMA device names as the kernel makes them: mlx5_0, ibp12s0, rocep1s0f1, irdma0.
_RDMA_DEVICE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NODE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# PCI address domain:bus:device.function, as lspci -D and sysfs print it.
_PCI_BUS_ID = re.compile(r"(?:[0-9A-Fa-f]{4}|[0-9A-Fa-f]{8}):[0-9A-Fa-f]{2}:[0-1][0-9A-Fa-f]\.[0-7]")
# Path components: letters, digits and _ . @ + - ; never starting with '-'.
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9_.@+][A-Za-z0-9_.@+-]{0,254}")
_INT = re.compile(r"-?[0-9]{1,19}")
_ALERTNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _refused(name, WRONG_TYPE, f"expected text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise _refused(name, TOO_LONG, f"value longer than {MAX_TEXT} characters")
    return value


def _fullmatch(name: str, pattern: re.Pattern, value: Any, what: str) -> str:
    text = _text(name, value)
    if not pattern.fullmatch(text):
        raise _refused(name, MALFORMED, f"{text!r} is not {what}")
    return text


def _int(name: str, spec: Mapping, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _refused(name, WRONG_TYPE, f"expected an integer, got {type(value).__name__}")
    if isinstance(value, str):
        if not _INT.fullmatch(value):
            raise _refused(name, MALFORMED, f"{value[:80]!r} is not an integer")
        value = int(value)
    lo, hi = spec["min"], spec["max"]
    if not lo <= value <= hi:
        raise _refused(name, OUT_OF_RANGE, f"{value} is outside {lo}..{hi}")
    return value


def _enum(name: str, spec: Mapping, value: Any) -> str:
    text = _text(name, value)
    if text not in spec["values"]:
        raise _refused(name, NOT_A_CHOICE, f"{text[:80]!r} is not one of {', '.join(spec['values'])}")
    return text


def _netdev(name: str, spec: Mapping, value: Any) -> str:
    text = _fullmatch(name, _NETDEV, value, "a network interface name (1-15 of A-Z a-z 0-9 _ . -)")
    if text in (".", ".."):
        raise _refused(name, MALFORMED, f"{text!r} is not a network interface name")
    return text


def _rdma_device(name: str, spec: Mapping, value: Any) -> str:
    return _fullmatch(name, _RDMA_DEVICE, value, "an RDMA device name (like mlx5_0)")


def _node(name: str, spec: Mapping, value: Any) -> str:
    text = _text(name, value)
    if len(text) > 253 or not _NODE.fullmatch(text):
        raise _refused(name, MALFORMED, f"{text[:80]!r} is not a host name")
    return text


def _pci_bus_id(name: str, spec: Mapping, value: Any) -> str:
    return _fullmatch(name, _PCI_BUS_ID, value, "a PCI bus id (like 0000:18:00.0)").lower()


def _path(name: str, spec: Mapping, value: Any) -> str:
    text = _text(name, value)
    parts = text.split("/")
    if not text.startswith("/") or text == "/":
        raise _refused(name, MALFORMED, f"{text[:80]!r} is not an absolute path below /")
    if text.endswith("/") or any(p in ("", ".", "..") or not _PATH_COMPONENT.fullmatch(p) for p in parts[1:]):
        raise _refused(name, MALFORMED, f"{text[:80]!r} is not a normalized path of A-Z a-z 0-9 _ . @ + - "
                         "components (no '..', no empty or '-'-led component)")
    roots = spec["under"]
    if not any(text == root or text.startswith(root.rstrip("/") + "/") for root in roots):
        raise _refused(name, NOT_UNDER, f"{text!r} is not under {' or '.join(roots)}")
    return text


Checker = Callable[[str, Mapping, Any], Any]

# The set of types, version PARAM_TYPES_VERSION. runbooks/schema.json lists the same names
# (a test holds them equal) with each type's required settings.
PARAM_TYPES: dict[str, Checker] = {
    "int": _int,
    "enum": _enum,
    "netdev": _netdev,
    "rdma_device": _rdma_device,
    "node": _node,
    "pci_bus_id": _pci_bus_id,
    "path": _path,
}

# The Python type of an accepted value, per parameter type (what a playbook receives).
VALUE_TYPES: dict[str, type] = {"int": int, "enum": str, "netdev": str, "rdma_device": str, "node": str,
                                "pci_bus_id": str, "path": str}


def check_value(name: str, spec: Mapping, value: Any) -> Any:
    """The value converted to its declared type, or ParamError. Nothing else escapes."""
    checker = PARAM_TYPES.get(spec.get("type", ""))
    if checker is None:
        raise _refused(name, UNKNOWN_TYPE, f"unknown parameter type {spec.get('type')!r}")
    return checker(name, spec, value)


def _source_value(spec: Mapping, name: str, labels: Mapping, annotations: Mapping) -> Any:
    source = annotations if spec.get("source", "label") == "annotation" else labels
    return source.get(spec.get("key", name))


def validate(params: Mapping[str, Mapping], labels: Mapping, annotations: Mapping | None = None, *,
             nodes: Iterable[str] | None = None,
             allow_missing: bool = False) -> dict[str, Any]:
    """Every declared parameter's value, typed; ParamError naming each value that does not fit.

    labels/annotations: what the alert (or a person's --label) supplied. A label a runbook does
    not declare is dropped: it never reaches a step. `alertname`, when present, must be an alert
    name. allow_missing: a dry-run plan shows `<name?>` for a value not
    given instead of failing.
    """
    annotations = annotations or {}
    out: dict[str, Any] = {}
    problems: list[ParamProblem] = []
    if "alertname" in labels:
        try:
            out["alertname"] = _fullmatch("alertname", _ALERTNAME, labels["alertname"], "an alert name")
        except ParamError as exc:
            problems += exc.problems
    for name, spec in params.items():
        raw = _source_value(spec, name, labels, annotations)
        if raw is None:
            if spec.get("required", True) and not allow_missing:
                where = "annotation" if spec.get("source") == "annotation" else "label"
                problems.append(ParamProblem(name, MISSING, f"{name}: required, and the trigger has no "
                                                            f"{spec.get('key', name)!r} {where}"))
            continue
        try:
            value = check_value(name, spec, raw)
            if spec["type"] == "node" and nodes is not None and value not in set(nodes):
                raise _refused(name, NOT_A_NODE, f"{value!r} is not a node of this cluster")
            out[name] = value
        except ParamError as exc:
            problems += exc.problems
    if problems:
        raise ParamError(*problems)
    return out
