"""Failover: read fault events from the store, decide, and quarantine within policy.

The controller is the only stage that acts on faults (detectors never act). For each
pending event it decides one verdict and records it:

* `no_action`            the fault's action keeps the node in service (e.g. restart_app)
* `already_quarantined`  the node is out of service already
* `refused_blast_radius` quarantining would exceed `policy.max_unavailable`: alert, don't act
* `would_quarantine`     dry-run: what would have happened, audited, nothing changed
* `quarantine`           the node is taken out of service through the scheduler backend

Crash safety: the intent (`quarantining`) is written before the scheduler is called and
the event is marked handled only after; a restarted controller finishes an interrupted
quarantine (the backend's calls are idempotent) and never acts twice on one event. Each
audit record is appended before the store commit it describes, so a crash in between
may repeat a record after the restart but never loses one.
"""

from __future__ import annotations

import threading
import time

from aidc.audit import AuditLog
from aidc.audit.log import default_actor
from aidc.events import Decision, FaultEvent
from aidc.failover.scheduler import SchedulerBackend
from aidc.spec import ClusterSpec
from aidc.store import Store

OUT_OF_SERVICE = ("quarantining", "quarantined")


class FailoverController:
    def __init__(self, spec: ClusterSpec, store: Store, audit: AuditLog, scheduler: SchedulerBackend,
                 dry_run: bool | None = None, actor: str | None = None):
        self.spec, self.store, self.audit, self.scheduler = spec, store, audit, scheduler
        self.dry_run = spec.policy.dry_run if dry_run is None else dry_run
        self.actor = actor or default_actor("failover")
        self.total_nodes = len(spec.nodes())
        self.max_unavailable = spec.policy.max_unavailable_nodes(self.total_nodes)
        # Dry-run changes no node state, so the nodes it would have quarantined are kept here
        # to decide later events as a real run would (already out, blast radius). This run
        # only: a restarted dry-run starts from the store's node states again.
        self._would_quarantine: list[str] = []

    # -- the loop ---------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish quarantines a previous run started but did not record as done.

        A node whose quarantine fails again is audited and left `quarantining` (still counted
        out of service), so one node the scheduler cannot handle does not stop the others' events.
        """
        finished = []
        for node in self.store.nodes_in_state("quarantining"):
            if self.dry_run:
                self.audit.append("failover.decision", "dry-run: would finish the quarantine a previous run started",
                                  actor=self.actor, node=node,
                                  payload={"resumed": True, "dry_run": True, "verdict": "would_quarantine"})
                continue
            try:
                warning = self.scheduler.quarantine(node, "resumed after controller restart")
            except Exception as exc:
                self.audit.append("failover.error", f"could not finish the quarantine after restart: {exc!r}",
                                  actor=self.actor, node=node, payload={"resumed": True, "error": repr(exc)})
                continue
            self.audit.append("failover.action", _with_warning("quarantine completed after restart", warning),
                              actor=self.actor, node=node, payload={"resumed": True, "warning": warning})
            self.store.set_node_state(node, "quarantined", "resumed after controller restart", self.actor)
            finished.append(node)
        return finished

    def run_once(self) -> list[Decision]:
        return [self.handle(event_id, event) for event_id, event in self.store.pending()]

    def run(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        self.recover()
        while not stop.is_set():
            self.run_once()
            stop.wait(poll_s)

    # -- one event ----------------------------------------------------------------
    def handle(self, event_id: int, event: FaultEvent) -> Decision:
        node = event.node
        payload = {"event_id": event_id, "kind": event.kind.value, "action": event.action.value,
                   "xid": event.xid, "gpu": event.gpu, "pci": event.pci, "line": event.line,
                   "observed_at": event.observed_at, "dry_run": self.dry_run}
        if event.action.value not in self.spec.policy.out_of_service_actions:
            return self._decide(event_id, node, "no_action",
                                f"{event.kind.value} asks for {event.action.value}: node stays in service", payload)
        unavailable = self.store.nodes_in_state(*OUT_OF_SERVICE)
        unavailable += [n for n in self._would_quarantine if n not in unavailable]
        # In dry-run the nodes it would have quarantined count as out: "would be", not "are".
        dry = "dry-run: " if self.dry_run else ""
        if node in unavailable:
            return self._decide(event_id, node, "already_quarantined", f"{dry}node is out of service already",
                                payload)
        if len(unavailable) + 1 > self.max_unavailable:
            reason = (f"{dry}blast radius: {len(unavailable)} node(s) out of service"
                      f" ({', '.join(unavailable) or '-'}), max_unavailable is {self.max_unavailable};"
                      " alerting instead of quarantining")
            self.audit.append("failover.alert", reason, actor=self.actor, node=node, payload=payload)
            return self._decide(event_id, node, "refused_blast_radius", reason, payload)
        what = f"XID {event.xid}" if event.xid is not None else event.kind.value.replace("_", " ")
        reason = f"{what} on gpu {event.gpu} asks for {event.action.value}"
        if self.dry_run:
            decision = self._decide(event_id, node, "would_quarantine", f"dry-run: would quarantine ({reason})",
                                    payload)
            self._would_quarantine.append(node)
            return decision
        return self._quarantine(event_id, node, reason, payload)

    def _decide(self, event_id: int, node: str, verdict: str, reason: str, payload: dict) -> Decision:
        self.audit.append("failover.decision", reason, actor=self.actor, node=node,
                          payload={**payload, "verdict": verdict})
        with self.store.transaction():
            self.store.mark_handled(event_id, verdict)
        return Decision(node, verdict, reason, self.dry_run, event_id)

    def _quarantine(self, event_id: int, node: str, reason: str, payload: dict) -> Decision:
        decided = self.audit.append("failover.decision", reason, actor=self.actor, node=node,
                                    payload={**payload, "verdict": "quarantine"})
        with self.store.transaction():
            self.store.set_node_state(node, "quarantining", reason, self.actor)
        started = time.monotonic()
        warning = self.scheduler.quarantine(node, reason)
        took_ms = (time.monotonic() - started) * 1000
        self.audit.append("failover.action", _with_warning(f"quarantined through {self.scheduler.name}", warning),
                          actor=self.actor, node=node,
                          payload={"event_id": event_id, "scheduler": self.scheduler.name, "warning": warning,
                                   "duration_ms": round(took_ms, 1), "decision_seq": decided.seq})
        with self.store.transaction():
            self.store.set_node_state(node, "quarantined", reason, self.actor)
            self.store.mark_handled(event_id, "quarantine")
        return Decision(node, "quarantine", reason, False, event_id, decided_at=decided.ts)

    # -- humans -------------------------------------------------------------------
    def release(self, node: str, reason: str, actor: str) -> None:
        """Return a node to service (an operator's decision, recorded as theirs)."""
        if self.dry_run:
            self.audit.append("failover.release", f"dry-run: would release ({reason})", actor=actor, node=node,
                              payload={"dry_run": True})
            return
        self.scheduler.release(node, reason)
        self.audit.append("failover.release", reason, actor=actor, node=node, payload={"dry_run": False})
        self.store.set_node_state(node, "in_service", reason, actor)


def _with_warning(reason: str, warning: str | None) -> str:
    return f"{reason}; {warning}" if warning else reason
