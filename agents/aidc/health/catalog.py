"""Classify faults with the versioned catalog `data/xid_catalog.yaml`.

The catalog is data, not code: an operator changes an action by editing the file (and
its version), and every classification reports which catalog version made it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from aidc.errors import SpecError
from aidc.events import Action, FaultKind

CATALOG_FILE = "data/xid_catalog.yaml"
FOLLOW_STATED = "follow_stated"
# Where a fault reaches: one GPU (failover may take that GPU out alone) or the node.
SCOPES = ("gpu", "node")
# An operator's catalog written before scopes and weights: every fault takes the node, as it
# did then, and counts 1 (the shipped catalog states both for every entry; a test keeps it so).
DEFAULT_SCOPE, DEFAULT_WEIGHT = "node", 1

# "GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)". The text is a
# kernel-log line: ASCII digits only (int() would read "２" as 2), a code no longer than the
# driver's 32-bit value, and each run of spaces matched by one quantifier, so that no input
# can make the pattern backtrack for long.
_RECOVERY_CODE = r"(0x[0-9a-f]{1,8}|[0-9]{1,10})(?![0-9a-z])"
_RECOVERY_RE = re.compile(rf"recovery action changed from\s+(?:{_RECOVERY_CODE}\s*)?(?:\(([^)]*)\)\s*)?"
                          rf"to\s+(?:{_RECOVERY_CODE}\s*)?(?:\(([^)]*)\))?", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True)
class Classification:
    action: Action
    reason: str
    catalog_version: str


@dataclass(frozen=True)
class XidCatalog:
    version: str
    unknown_action: Action
    xids: dict[int, dict]
    recovery_actions: dict[int, dict]
    sxid: dict[str, Action]
    faults: dict[str, Action]
    source: dict
    # Per fault kind: {scope, weight} (the XIDs keep theirs in their entries).
    fault_traits: dict[str, dict] = field(default_factory=dict)
    # unknown XIDs: {scope, weight}; NVSwitch SXids: {scope, weight: {severity: weight}}.
    unknown_traits: dict = field(default_factory=lambda: {"scope": "node", "weight": 1.0})
    sxid_traits: dict = field(default_factory=lambda: {"scope": "node", "weight": {}})

    def classify_xid(self, xid: int, text: str = "") -> Classification:
        entry = self.xids.get(int(xid))
        if entry is None:
            return Classification(self.unknown_action, f"XID {xid} is not in the catalog: fail safe to a human",
                                  self.version)
        if entry["action"] == FOLLOW_STATED:
            return self._stated(xid, entry, text)
        return Classification(Action(entry["action"]), f"XID {xid}: {entry.get('name', '')}", self.version)

    def escalation_rule(self, xid: int | None) -> dict:
        """The catalog's escalation keys for an XID (`escalate`, `sticky`, `repeats`,
        `window_min`); empty for a fault that is not an XID or has none."""
        entry = self.xids.get(int(xid)) if xid is not None else None
        return {k: entry[k] for k in ("escalate", "sticky", "repeats", "window_min") if entry and k in entry}

    def traits(self, kind: FaultKind, xid: int | None, action: Action | None = None) -> tuple[str, float]:
        """(scope, weight) of a fault: whether it stays in one GPU, and what one sighting counts
        towards a repeat offender. An NVSwitch SXid's weight is its severity's, found by the
        action that severity classifies to (`action`)."""
        if kind == FaultKind.XID and xid is not None:
            entry = self.xids.get(int(xid)) or self.unknown_traits
            return entry["scope"], float(entry["weight"])
        if kind == FaultKind.NVSWITCH_SXID:
            weights = self.sxid_traits["weight"]
            severity = next((s for s, a in self.sxid.items() if a == action), None)
            return self.sxid_traits["scope"], float(weights.get(severity, self.unknown_traits["weight"]))
        entry = self.fault_traits.get(kind.value if isinstance(kind, FaultKind) else str(kind)) or self.unknown_traits
        return entry["scope"], float(entry["weight"])

    def follows_stated(self, xid: int) -> bool:
        """True when the XID's action is the one its message text states (XID 154): an NVML
        event, which carries no text, cannot be classified by itself."""
        return (self.xids.get(int(xid)) or {}).get("action") == FOLLOW_STATED

    def _stated(self, xid: int, entry: dict, text: str) -> Classification:
        """XID 154: honour the driver's own stated recovery action."""
        m = _RECOVERY_RE.search(text or "")
        if m:
            code_text, name = m.group(3), (m.group(4) or "").strip()
            if code_text is not None:
                code = int(code_text, 16) if code_text.lower().startswith("0x") else int(code_text)
                if code in self.recovery_actions:
                    ra = self.recovery_actions[code]
                    return Classification(Action(ra["action"]),
                                          f"XID {xid}: driver states recovery action {code:#x} ({name or ra['names'][0]})",
                                          self.version)
            for code, ra in self.recovery_actions.items():
                if name and name.lower() in (n.lower() for n in ra["names"]):
                    return Classification(Action(ra["action"]),
                                          f"XID {xid}: driver states recovery action '{name}'", self.version)
        return Classification(self.unknown_action,
                              f"XID {xid}: {entry.get('name', '')}, stated action not understood: fail safe to a human",
                              self.version)

    def classify_sxid(self, severity: str) -> Classification:
        for key, action in self.sxid.items():
            if key.lower() == (severity or "").strip().lower():
                return Classification(action, f"NVSwitch SXid, {key}", self.version)
        return Classification(self.unknown_action, f"NVSwitch SXid, severity {severity!r} unknown", self.version)

    def classify_kernel(self, kind: FaultKind, xid: int | None, message: str = "",
                        severity: str | None = None) -> Classification:
        """A fault read from the kernel log: an XID, an NVSwitch SXid, or a non-XID fault."""
        if kind == FaultKind.XID and xid is not None:
            return self.classify_xid(xid, message)
        if kind == FaultKind.NVSWITCH_SXID:
            return self.classify_sxid(severity or "")
        return self.classify_fault(kind)

    def classify_fault(self, kind: FaultKind | str) -> Classification:
        key = kind.value if isinstance(kind, FaultKind) else str(kind)
        action = self.faults.get(key)
        if action is None:
            return Classification(self.unknown_action, f"fault kind {key!r} is not in the catalog", self.version)
        return Classification(action, f"{key}", self.version)


def _parse(data: dict, origin: str) -> XidCatalog:
    def bad(key: str, expected: str):
        raise SpecError(origin, key, expected)

    if not isinstance(data, dict):
        bad("(top)", "a mapping with version, xids, faults")
    valid = {a.value for a in Action}
    version = data.get("version")
    if not isinstance(version, str) or not version:
        bad("version", "a non-empty string")
    if not isinstance(data.get("source"), dict) or "name" not in data["source"]:
        bad("source", "a mapping naming the upstream source (name, url)")

    def action(key: str, value, allow_follow: bool = False) -> str:
        if value in valid or (allow_follow and value == FOLLOW_STATED):
            return value
        bad(key, f"one of {', '.join(sorted(valid))}" + (f" or {FOLLOW_STATED}" if allow_follow else "")
            + f", got {value!r}")

    unknown = Action(action("unknown_action", data.get("unknown_action")))
    xids: dict[int, dict] = {}
    for code, entry in (data.get("xids") or {}).items():
        if not isinstance(code, int) or not isinstance(entry, dict):
            bad(f"xids.{code}", "an integer XID mapped to {action: ..., name: ...}")
        action(f"xids.{code}.action", entry.get("action"), allow_follow=True)
        if "escalate" in entry:
            action(f"xids.{code}.escalate", entry["escalate"])
        if "sticky" in entry and not isinstance(entry["sticky"], bool):
            bad(f"xids.{code}.sticky", f"true or false, got {entry['sticky']!r}")
        if "repeats" in entry and (type(entry["repeats"]) is not int or not 2 <= entry["repeats"] <= 1000):
            bad(f"xids.{code}.repeats", f"an integer 2-1000 (sightings that escalate), got {entry['repeats']!r}")
        if "window_min" in entry and (type(entry["window_min"]) not in (int, float)
                                      or not 0 < entry["window_min"] <= 43200):
            bad(f"xids.{code}.window_min", f"minutes, above 0 and at most 43200, got {entry['window_min']!r}")
        entry = {"scope": DEFAULT_SCOPE, "weight": DEFAULT_WEIGHT, **entry}
        _check_traits(bad, f"xids.{code}", entry)
        xids[code] = entry
    recovery: dict[int, dict] = {}
    for code, entry in (data.get("recovery_actions") or {}).items():
        if not isinstance(code, int) or not isinstance(entry, dict) or not entry.get("names"):
            bad(f"recovery_actions.{code}", "an integer code mapped to {names: [...], action: ...}")
        action(f"recovery_actions.{code}.action", entry.get("action"))
        recovery[code] = entry
    if any(e["action"] == FOLLOW_STATED for e in xids.values()) and not recovery:
        bad("recovery_actions", "present when any XID uses follow_stated")
    sxid = {k: Action(action(f"sxid.{k}", v)) for k, v in (data.get("sxid") or {}).items()}
    faults: dict[str, Action] = {}
    traits: dict[str, dict] = {}
    kinds = {k.value for k in FaultKind}
    for kind, entry in (data.get("faults") or {}).items():
        if kind not in kinds:
            bad(f"faults.{kind}", f"a fault kind ({', '.join(sorted(kinds))})")
        faults[kind] = Action(action(f"faults.{kind}.action", (entry or {}).get("action")))
        entry = {"scope": DEFAULT_SCOPE, "weight": DEFAULT_WEIGHT, **(entry or {})}
        _check_traits(bad, f"faults.{kind}", entry)
        traits[kind] = {"scope": entry["scope"], "weight": float(entry["weight"])}
    unknown_traits = {"scope": data.get("unknown_scope", "node"), "weight": data.get("unknown_weight", 1)}
    _check_traits(bad, "unknown", unknown_traits, prefix="unknown_")
    sxid_traits = data.get("sxid_traits") or {"scope": "node", "weight": {}}
    if not isinstance(sxid_traits, dict) or not isinstance(sxid_traits.get("weight"), dict) \
            or set(sxid_traits["weight"]) - set(sxid):
        bad("sxid_traits", "{scope: gpu|node, weight: {<severity of sxid>: number}}")
    for severity, weight in sxid_traits["weight"].items():
        _check_traits(bad, f"sxid_traits.weight.{severity}", {"scope": sxid_traits.get("scope"), "weight": weight})
    return XidCatalog(version, unknown, xids, recovery, sxid, faults, data["source"], traits,
                      {"scope": unknown_traits["scope"], "weight": float(unknown_traits["weight"])}, sxid_traits)


def _check_traits(bad, key: str, entry: dict, prefix: str = "") -> None:
    """Every entry says its scope (gpu | node) and its repeat-offender weight (a number >= 0)."""
    where = f"{key}." if not prefix else ""
    if entry.get("scope") not in SCOPES:
        bad(f"{where}{prefix}scope", f"gpu or node (is the fault local to one GPU?), got {entry.get('scope')!r}")
    weight = entry.get("weight")
    if type(weight) not in (int, float) or not 0 <= weight <= 100:
        bad(f"{where}{prefix}weight", f"a number 0-100 (what one sighting counts towards a repeat offender), "
            f"got {weight!r}")


def load_catalog(path: str | Path | None = None) -> XidCatalog:
    """Load a catalog file (default: the shipped one). Bad content is a SpecError naming the key."""
    if path is None:
        return _shipped()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), "(file)", f"a readable catalog file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), "(yaml)", f"valid YAML ({exc})") from None
    return _parse(data, str(path))


@lru_cache(maxsize=1)
def _shipped() -> XidCatalog:
    text = resources.files("aidc").joinpath(CATALOG_FILE).read_text()
    return _parse(yaml.safe_load(text), f"aidc/{CATALOG_FILE}")
