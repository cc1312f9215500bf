"""Escalation and the circuit breaker: the one gate every automatic remediation passes.

The failover controller (every scheduler backend: lab, Slurm, Kubernetes) and the runbook
engine both ask this gate before they take a node out of service, and tell it when they did;
it sits above the scheduler backends and keeps its history in the store (SQLite), so a
restarted controller decides exactly as before.

* **Escalation.** The catalog gives a fault's immediate action. The same fault (XID code, or
  fault kind) on the same GPU seen `repeats` times within `window_min` minutes before and at this
  sighting moves the action one rung up the ladder restart_app -> reset_gpu -> reboot_node ->
  contact_support (2 x repeats: two rungs); sightings closer than `burst_s` count once. The
  catalog's `escalate` names the first rung when it is not the next one, `sticky` faults (they
  survive their remediation) escalate after `sticky_repeats`, and an entry's `repeats` /
  `window_min` override the policy's. A node remediated `node_remediations` times within
  `node_window_days` goes to a person: its next remediation is contact_support. Thresholds are
  data (policy.escalation in the stack, the XID catalog). An escalation is audited once per
  event (`failover.escalation`, with the sightings or remediations that caused it) and kept in
  the store, so re-deciding a deferred event, or a restart, neither repeats nor changes it.
* **Circuit breaker.** More quarantines in `policy.breaker.window_min` than
  `policy.breaker.max_quarantines` (a count, or a percentage of the fleet) means something
  larger than a node is wrong (a bad driver rollout, a cooling failure, a detector bug): the
  gate refuses the quarantine that would exceed it, audits `failover.breaker.open` with the
  quarantines that tripped it, and latches open in the store. Every later quarantine is refused
  until a person with the approver role runs `aidc failover breaker reset --reason ...`.
  Refused events are not dropped: they stay pending and are decided again when capacity
  returns (a release, a reset), see aidc.failover.controller.

Dry-run: escalations are decided and audited (marked dry-run); the breaker "would open" only in
memory, so a dry-run never latches it.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import asdict, dataclass, field

from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.provenance import REFUSED_SOURCE
from aidc.health.catalog import XidCatalog, load_catalog

LADDER = (Action.RESTART_APP, Action.RESET_GPU, Action.REBOOT_NODE, Action.CONTACT_SUPPORT)
# Remediations that are the machine's own: a node remediated too often gets a person instead.
AUTOMATIC = (Action.RESET_GPU, Action.REBOOT_NODE)
BREAKER_KEY = "failover.breaker"
# Bumped whenever capacity returns through aidc (a release, a breaker reset): the controller
# then decides its deferred events at once instead of at the next periodic re-check.
CAPACITY_KEY = "failover.capacity"
ESCALATION_KEY = "escalation:{}"
DAY_S = 86400.0


@dataclass(frozen=True)
class Escalation:
    from_action: str
    to_action: str
    rule: str  # "repeats" | "node_remediations"
    reason: str
    thresholds: dict
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def fault_key(event: FaultEvent) -> str:
    return f"xid:{event.xid}" if event.kind == FaultKind.XID and event.xid is not None else event.kind.value


def climb(action: Action, rungs: int, first: Action | None = None) -> Action:
    """`action` moved `rungs` up the ladder; `first` is the first rung when the catalog names one."""
    if rungs <= 0 or action == Action.CONTACT_SUPPORT:
        return action
    if first is None:
        if action not in LADDER:
            return action  # `ignore` escalates only where the catalog says to what
        first = LADDER[LADDER.index(action) + 1]
    return LADDER[min(LADDER.index(first) + rungs - 1, len(LADDER) - 1)] if first in LADDER else first


def sightings(history: list[tuple[int, FaultEvent, str | None]], event: FaultEvent, window_s: float,
              burst_s: float) -> list[dict]:
    """The sightings that count: same fault, same GPU, within the window ending at this event's
    observation, one per burst; oldest first, this event's burst last."""
    key, start = fault_key(event), event.observed_at - window_s
    # A fault another node reported (refused_source) is no sighting of this node's fault.
    same = [(e.observed_at, i, o) for i, e, o in history
            if o != REFUSED_SOURCE and fault_key(e) == key and e.gpu == event.gpu and start <= e.observed_at <= event.observed_at]
    return bursts(same, burst_s)


def bursts(rows: list[tuple[float, int, str | None]], burst_s: float) -> list[dict]:
    """(observed_at, event id, outcome) rows of one fault, one entry per burst (rows closer than
    `burst_s` to the burst's first count once), oldest first."""
    counted: list[dict] = []
    for at, event_id, outcome in sorted(rows):
        if counted and at - counted[-1]["observed_at"] < burst_s:
            counted[-1]["events"].append(event_id)
            continue
        counted.append({"observed_at": at, "events": [event_id], "outcome": outcome})
    return counted


def _locked(method):
    """The runbook engine's executor threads share one gate (one store and audit connection)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class RemediationGate:
    def __init__(self, spec, store, audit, catalog: XidCatalog | None = None, metrics=None, actor: str = "aidc"):
        self.spec, self.store, self.audit, self.metrics, self.actor = spec, store, audit, metrics, actor
        self.catalog = catalog or load_catalog()
        self.escalation = spec.policy.escalation
        self.breaker_policy = spec.policy.breaker
        self.total_nodes = len(spec.nodes())
        self._dry_open: dict | None = None  # dry-run: the breaker that would be open (never latched)
        self._dry_quarantines: list[dict] = []
        self._lock = threading.RLock()

    # -- escalation -----------------------------------------------------------------------
    @_locked
    def action_for(self, event_id: int, event: FaultEvent, dry_run: bool = False) -> tuple[Action, Escalation | None]:
        """The action to take for this event: the catalog's, or escalated (audited once)."""
        memo = self.store.get(ESCALATION_KEY.format(event_id))
        if memo:
            decided = Escalation(**json.loads(memo))
            return Action(decided.to_action), decided
        decided = self._escalate(event_id, event)
        if decided is None:
            return event.action, None
        self.audit.append("failover.escalation", decided.reason, actor=self.actor, node=event.node,
                          payload={**decided.to_dict(), "event_id": event_id, "dry_run": dry_run,
                                   "gpu": event.gpu, "xid": event.xid, "kind": event.kind.value})
        if not dry_run:  # a dry-run keeps nothing: the live run decides (and audits) it again
            with self.store.transaction():
                self.store.put(ESCALATION_KEY.format(event_id), json.dumps(decided.to_dict()))
        if self.metrics is not None:
            self.metrics.escalated(decided.from_action, decided.to_action)
        return Action(decided.to_action), decided

    def _escalate(self, event_id: int, event: FaultEvent) -> Escalation | None:
        policy, rule = self.escalation, self.catalog.escalation_rule(event.xid if event.kind == FaultKind.XID else None)
        sticky = bool(rule.get("sticky"))
        repeats = policy.sticky_repeats if sticky else int(rule.get("repeats", policy.repeats))
        window_min = float(rule.get("window_min", policy.window_min))
        first = Action(rule["escalate"]) if "escalate" in rule else None
        action, escalation = event.action, None
        seen = sightings(self.store.node_history(event.node, event_id), event, window_min * 60, policy.burst_s)
        rungs = len(seen) // repeats
        climbed = climb(action, rungs, first)
        if climbed != action:
            what = f"XID {event.xid}" if event.xid is not None else event.kind.value
            escalation = Escalation(
                action.value, climbed.value, "repeats",
                f"{what} on gpu {event.gpu} seen {len(seen)} times within {window_min:g} min "
                f"({'sticky, ' if sticky else ''}{repeats} escalate one rung): {action.value} -> {climbed.value}",
                {"repeats": repeats, "window_min": window_min, "burst_s": policy.burst_s, "sticky": sticky,
                 "escalate": first.value if first else None},
                seen)
            action = climbed
        if action in AUTOMATIC:
            # Remediations are recorded on this host's clock, so their window is measured on it.
            done = self.store.remediations(time.time() - policy.node_window_days * DAY_S, node=event.node)
            if len(done) >= policy.node_remediations:
                reason = (f"{event.node} was remediated {len(done)} times in {policy.node_window_days:g} days "
                          f"(limit {policy.node_remediations}): {action.value} goes to a person (contact_support)")
                escalation = Escalation(event.action.value, Action.CONTACT_SUPPORT.value, "node_remediations",
                                        reason if escalation is None else f"{escalation.reason}; {reason}",
                                        {"node_remediations": policy.node_remediations,
                                         "node_window_days": policy.node_window_days,
                                         **(escalation.thresholds if escalation else {})},
                                        (escalation.history if escalation else []) + done)
        return escalation

    @_locked
    def needs_person(self, node: str) -> str | None:
        """Why the node's next remediation must be a person's, or None (the runbook engine asks)."""
        policy = self.escalation
        done = self.store.remediations(time.time() - policy.node_window_days * DAY_S, node=node)
        if len(done) >= policy.node_remediations:
            return (f"{node} was remediated {len(done)} times in {policy.node_window_days:g} days "
                    f"(policy.escalation.node_remediations {policy.node_remediations}): a person decides")
        return None

    # -- the breaker ------------------------------------------------------------------------
    def breaker(self) -> dict:
        value = self.store.get(BREAKER_KEY)
        return json.loads(value) if value else {"open": False}

    def breaker_limit(self) -> int:
        return self.breaker_policy.limit(self.total_nodes)

    def recent_quarantines(self, now: float | None = None) -> list[dict]:
        """Quarantines in the window; a person's reset accepts those before it."""
        now = time.time() if now is None else now
        since = max(now - self.breaker_policy.window_min * 60, self.breaker().get("closed_at") or 0.0)
        return self.store.remediations(since)

    @_locked
    def admit(self, node: str, dry_run: bool = False, ref: str | None = None) -> str | None:
        """None when one more quarantine is allowed; else why not. The quarantine that would
        exceed the policy trips the breaker (audited, latched in the store) and is refused."""
        state = self._dry_open if dry_run and self._dry_open else self.breaker()
        if state.get("open"):
            return (f"{'dry-run: ' if dry_run else ''}circuit breaker open since {utc_text(state['opened_at'])} "
                    f"({state['reason']}); failover does not act until a person runs "
                    "`aidc failover breaker reset --reason ...`")
        recent = self.recent_quarantines() + (self._dry_quarantines if dry_run else [])
        limit = self.breaker_limit()
        if len(recent) + 1 <= limit:
            return None
        reason = (f"{len(recent)} quarantine(s) in the last {self.breaker_policy.window_min:g} min "
                  f"(policy.breaker.max_quarantines {self.breaker_policy.max_quarantines} = {limit} of "
                  f"{self.total_nodes} nodes); one more on {node} would exceed it")
        state = {"open": True, "opened_at": time.time(), "reason": reason, "node": node, "ref": ref,
                 "quarantines": recent, "limit": limit, "window_min": self.breaker_policy.window_min}
        if dry_run:
            self.audit.append("failover.breaker.open", f"dry-run: circuit breaker would open: {reason}",
                              actor=self.actor, node=node, payload={**state, "dry_run": True})
            self._dry_open = state
        else:
            self.audit.append("failover.breaker.open", f"circuit breaker open: {reason}", actor=self.actor,
                              node=node, payload={**state, "dry_run": False})
            with self.store.transaction():
                self.store.put(BREAKER_KEY, json.dumps(state))
        self.refresh_metrics()
        return f"{'dry-run: ' if dry_run else ''}circuit breaker opened: {reason}"

    @_locked
    def record(self, node: str, action: str, source: str, ref: str, dry_run: bool = False) -> None:
        """A quarantine happened (call inside the store transaction that records it)."""
        if dry_run:
            self._dry_quarantines.append({"node": node, "action": action, "source": source, "ref": ref,
                                          "at": time.time()})
        else:
            self.store.record_remediation(node, action, source, ref)

    @_locked
    def reset(self, actor: str, reason: str, note: str | None = None) -> dict:
        """A person closes the breaker (audited as theirs); returns the state it closed."""
        state = self.breaker()
        noted = {"note": note} if note else {}
        self.audit.append("failover.breaker.reset", reason if state.get("open") else f"{reason} (was not open)",
                          actor=actor, payload={"was": state, "reason": reason, **noted})
        with self.store.transaction():
            self.store.put(BREAKER_KEY, json.dumps({"open": False, "closed_at": time.time(), "closed_by": actor,
                                                    "close_reason": reason, "last_opened_at": state.get("opened_at")}))
            bump_capacity(self.store)
        self.refresh_metrics()
        return state

    def refresh_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.breaker(bool(self.breaker().get("open")))


def bump_capacity(store) -> None:
    """Tell the controller capacity returned (call inside a store transaction)."""
    store.put(CAPACITY_KEY, str(int(store.get(CAPACITY_KEY) or 0) + 1))


def utc_text(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
