"""Repeat offenders: the escalation ladder's last rung, kept per GPU and per node.

Escalation (aidc.failover.remediation) moves one fault up the ladder when it repeats; this
module remembers a *part* that keeps failing, whatever the faults. Each fault event counts its
catalog `weight` (data/xid_catalog.yaml: a row-remap failure 3, a double-bit ECC error 1.5, a
thermal event 0.25), once per burst (policy.escalation.burst_s, as escalation counts), towards

* its GPU, when the catalog's `scope` is gpu (the fault stays in that GPU), else
* its node (NVLink, NVSwitch, the bus, the driver, a NIC, a reboot).

A target whose faults weigh `policy.offenders.max_faults` or more within
`policy.offenders.window_days` (before the fault's observation) is marked a repeat offender:
audited once (`failover.offender`, with every fault that counted), kept in the store (one
key, so the SQLite and PostgreSQL stores both hold it), exported as
`aidc_failover_repeat_offender{node,gpu}` (alert AidcRepeatOffender). From then on:

* recertification does not return it: `aidc failover release` and a runbook's `release` step
  refuse a node that is an offender or holds an offending GPU, and a GPU that offends or whose
  node does (`refusal`), audited as `failover.release_refused`;
* a fault on it takes it out of service even where the catalog's action would not;
* only an approver clears it (`aidc failover offender clear NODE[/GPU] --reason`, audited as
  `failover.offender.clear`); faults observed before the clear never count again.

Dry-run: the mark is audited (marked dry-run) and kept in memory only.
"""

from __future__ import annotations

import json
import re
import time

from aidc.errors import AidcError
from aidc.events import FaultEvent
from aidc.failover.provenance import REFUSED_SOURCE
from aidc.failover.remediation import bursts, fault_key

OFFENDERS_KEY = "failover.offenders"         # {target: mark}
CLEARED_KEY = "failover.offenders.cleared"   # {target: {at, by, reason}}: faults before it no longer count
DAY_S = 86400.0
_TARGET = re.compile(r"^(?P<node>[^/\s]{1,253})(?:/(?:gpu)?(?P<gpu>[0-9]{1,3}))?$")
# Outcomes that are no sighting of this node's fault (another node spoke for it; not a node).
_NOT_COUNTED = (REFUSED_SOURCE, "refused_unknown_node")


class OffenderError(AidcError):
    """A target that is not NODE or NODE/GPU, or one that is not an offender."""


class OffenderRefused(AidcError):
    """Recertification refused: the node or GPU is a repeat offender (an approver clears it)."""

    exit_code = 1


def target(node: str, gpu: int | None = None) -> str:
    """The name of what offends: `node`, or `node/gpu<index>`."""
    return node if gpu is None else f"{node}/gpu{gpu}"


def parse_target(text: str) -> tuple[str, int | None]:
    """`n1` -> ("n1", None); `n1/3` or `n1/gpu3` -> ("n1", 3)."""
    m = _TARGET.match(text or "")
    if not m:
        raise OffenderError(f"{text!r} is not NODE or NODE/GPU (e.g. n1 or n1/3)")
    return m["node"], None if m["gpu"] is None else int(m["gpu"])


def marks(store) -> dict[str, dict]:
    """Every target marked a repeat offender now, by target name."""
    value = store.get(OFFENDERS_KEY)
    return json.loads(value) if value else {}


def offender_state(store, node: str, gpu: int | None = None) -> dict | None:
    """What the health API shows for a node or a GPU: its own mark, or its node's (a GPU of an
    offending node does not return either); None when neither offends."""
    current = marks(store)
    own = current.get(target(node, gpu))
    if own is not None or gpu is None:
        return own
    return current.get(target(node))


def refusal(store, node: str, gpu: int | None = None) -> str | None:
    """Why recertification must not return this node (or GPU) to service, or None."""
    current = marks(store)
    if gpu is None:
        held = sorted(t for t in current if t == node or t.startswith(f"{node}/"))
    else:
        held = [t for t in (target(node, gpu), node) if t in current]
    if not held:
        return None
    said = "; ".join(f"{t}: {current[t]['reason']}" for t in held)
    return (f"{target(node, gpu)} is not returned to service: repeat offender ({said}); it is marked for "
            f"repair/RMA and only an approver clears it (`aidc failover offender clear {held[0]} --reason ...`)")


class Offenders:
    """Counts faults per target and marks repeat offenders (one per controller, on its store)."""

    def __init__(self, spec, store, audit, catalog, metrics=None, actor: str = "aidc"):
        self.policy, self.burst_s = spec.policy.offenders, spec.policy.escalation.burst_s
        self.store, self.audit, self.catalog, self.metrics, self.actor = store, audit, catalog, metrics, actor
        self._dry_marks: dict[str, dict] = {}

    def target_of(self, event: FaultEvent) -> str:
        scope, _ = self.catalog.traits(event.kind, event.xid, event.action)
        return target(event.node, event.gpu if scope == "gpu" and event.gpu is not None else None)

    def weighed(self, event_id: int, event: FaultEvent) -> tuple[str, list[dict]]:
        """The target this event counts towards, and the bursts of faults that count (each with
        its fault, GPU and weight), in the window ending at this event."""
        name = self.target_of(event)
        cleared = (self._cleared().get(name) or {}).get("at", 0.0)
        start = max(event.observed_at - self.policy.window_days * DAY_S, cleared)
        by_fault: dict[tuple, list] = {}
        for i, e, outcome in self.store.node_history(event.node, event_id):
            if outcome in _NOT_COUNTED or not start <= e.observed_at <= event.observed_at \
                    or self.target_of(e) != name:
                continue
            by_fault.setdefault((fault_key(e), e.gpu), []).append((e.observed_at, i, outcome, e))
        counted = []
        for (key, gpu), rows in by_fault.items():
            weight = self.catalog.traits(rows[0][3].kind, rows[0][3].xid, rows[0][3].action)[1]
            for burst in bursts([r[:3] for r in rows], self.burst_s):
                counted.append({"fault": key, "gpu": gpu, "weight": weight, **burst})
        return name, sorted(counted, key=lambda b: b["observed_at"])

    def observe(self, event_id: int, event: FaultEvent, dry_run: bool = False) -> dict | None:
        """The mark of this event's target after counting it: a new one is audited and kept
        (in memory only under dry-run); None while the target is under the threshold."""
        name = self.target_of(event)
        known = marks(self.store).get(name) or (self._dry_marks.get(name) if dry_run else None)
        if known is not None:
            return known
        if self.catalog.traits(event.kind, event.xid, event.action)[1] == 0:
            return None  # a fault that weighs nothing cannot be the one that crosses the line
        name, counted = self.weighed(event_id, event)
        total = round(sum(b["weight"] for b in counted), 3)
        if total < self.policy.max_faults:
            return None
        node, gpu = parse_target(name)
        reason = (f"faults weighing {total:g} within {self.policy.window_days:g} days "
                  f"(policy.offenders.max_faults {self.policy.max_faults:g})")
        mark = {"target": name, "node": node, "gpu": gpu, "reason": reason, "weight": total,
                "max_faults": self.policy.max_faults, "window_days": self.policy.window_days,
                "marked_at": time.time(), "event_id": event_id, "state": "repair", "history": counted,
                "catalog_version": self.catalog.version}
        self.audit.append("failover.offender", f"{'dry-run: ' if dry_run else ''}{name} is a repeat offender, "
                          f"marked for repair/RMA: {reason}", actor=self.actor, node=node,
                          payload={**mark, "dry_run": dry_run})
        if dry_run:
            self._dry_marks[name] = mark
        else:
            with self.store.transaction():
                current = marks(self.store)
                current[name] = mark
                self.store.put(OFFENDERS_KEY, json.dumps(current))
        self.refresh_metrics()
        return mark

    def clear(self, name: str, actor: str, reason: str, note: str | None = None) -> dict:
        """An approver clears a mark (audited as theirs); the faults before it stop counting."""
        node, gpu = parse_target(name)
        name = target(node, gpu)
        current = marks(self.store)
        if name not in current:
            raise OffenderError(f"{name} is not a repeat offender (offenders: {', '.join(sorted(current)) or 'none'})")
        was = current.pop(name)
        noted = {"note": note} if note else {}
        self.audit.append("failover.offender.clear", reason, actor=actor, node=node,
                          payload={"target": name, "gpu": gpu, "was": was, "reason": reason, **noted})
        with self.store.transaction():
            self.store.put(OFFENDERS_KEY, json.dumps(current))
            cleared = self._cleared()
            cleared[name] = {"at": time.time(), "by": actor, "reason": reason}
            self.store.put(CLEARED_KEY, json.dumps(cleared))
        self.refresh_metrics()
        return was

    def _cleared(self) -> dict:
        value = self.store.get(CLEARED_KEY)
        return json.loads(value) if value else {}

    def refresh_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.offenders(marks(self.store).values())
