"""One GPU out, the node keeps working: failover's GPU-level quarantine.

A fault the catalog calls local to one GPU (`scope: gpu`, data/xid_catalog.yaml) whose action
takes it out of service, on an event that names its GPU, takes that GPU out and leaves the
node's other GPUs in service, where the scheduler backend can do that (`gpu_isolation(node)`
says None):

* lab: the GPU's own training rank is stopped (lab.ranks: gpu runs one elastic agent per GPU)
  and its slot goes to a warm spare GPU; the node's other ranks keep training;
* Kubernetes with DRA (kubernetes.gpu_allocation: dra): a DeviceTaintRule (resource.k8s.io)
  taints that one device, so no claim is allocated it and pods using it are evicted;
* Kubernetes with the classic device plugin, and Slurm: no API takes one named GPU out (see
  docs/architecture.md), so the node is quarantined instead, and the decision's audit record
  says so (`gpu_fallback`): never a partial action said as a whole one.

An action of reboot_node takes the node whatever the scope (a reboot stops every GPU).

Blast radius: a quarantined node counts all its GPUs, a GPU taken out alone one;
`policy.max_unavailable_gpus` bounds the sum (for node quarantines too), beside
`policy.max_unavailable` for nodes. The breaker counts a GPU quarantine as a quarantine.

Crash safety as for nodes: the intent (`quarantining`) is kept in the store before the backend
is called, the event is marked handled after; a restarted controller finishes the call
(backends' GPU calls are idempotent). GPU states live under one store key, so the SQLite and
PostgreSQL stores hold them alike.
"""

from __future__ import annotations

import functools
import json
import time

from aidc.events import Action, Decision, FaultEvent
from aidc.failover.offenders import OffenderRefused, parse_target, refusal, target
from aidc.failover.remediation import bump_capacity
from aidc.nodenames import UnknownNode, shown

GPUS_OUT_KEY = "failover.gpus_out"  # {"node/gpuN": {node, gpu, state, reason, event_id, at, scheduler}}


def gpus_out(store) -> dict[str, dict]:
    """Every GPU taken out alone (quarantining or quarantined), by `node/gpuN`."""
    value = store.get(GPUS_OUT_KEY)
    return json.loads(value) if value else {}


def gpu_state(store, node: str, gpu: int) -> dict | None:
    """The quarantine of one GPU (state, reason, event, when), or None while it is in service
    on its own account (its node may still be out: see the node's state)."""
    return gpus_out(store).get(target(node, gpu))


def _put(store, name: str, entry: dict | None) -> None:
    """Set or drop one GPU's entry (call inside a store transaction)."""
    current = gpus_out(store)
    if entry is None:
        current.pop(name, None)
    else:
        current[name] = entry
    store.put(GPUS_OUT_KEY, json.dumps(current))


class GpuQuarantine:
    """The controller's GPU path; `ctl` is its FailoverController (store, audit, gate, backend)."""

    def __init__(self, ctl):
        self.ctl = ctl
        self.gpus_per_node = {n.name: n.gpus for n in ctl.spec.nodes()}
        self.default_gpus = max(self.gpus_per_node.values(), default=8)
        self.max_gpus = ctl.spec.policy.max_unavailable_gpu_count(list(self.gpus_per_node.values()))
        self._would: list[str] = []  # dry-run: GPUs it would have taken out (this run only)

    # -- what the controller asks --------------------------------------------------------
    def applies(self, event: FaultEvent, action: Action) -> bool:
        scope, _ = self.ctl.gate.catalog.traits(event.kind, event.xid, event.action)
        return scope == "gpu" and event.gpu is not None and action != Action.REBOOT_NODE

    def isolation_refused(self, node: str) -> str | None:
        """Why the backend cannot take one GPU of `node` out (None: it can)."""
        ask = getattr(self.ctl.scheduler, "gpu_isolation", None)
        if ask is None:
            return f"the {self.ctl.scheduler.name} scheduler cannot take one GPU out (see docs/architecture.md)"
        return ask(node)

    def count(self, nodes_out: list[str]) -> tuple[int, list[str]]:
        """GPUs out of service: all of every node out, plus GPUs out alone on nodes in service."""
        alone = [t for t in list(gpus_out(self.ctl.store)) + self._would if parse_target(t)[0] not in nodes_out]
        total = sum(self.gpus_per_node.get(n, self.default_gpus) for n in nodes_out) + len(alone)
        self._report(total)
        return total, alone

    def node_refusal(self, node: str, nodes_out: list[str]) -> str | None:
        """The GPU blast radius for quarantining a whole node (None: within it)."""
        total, alone = self.count(nodes_out)
        # A node's own GPUs taken out alone are among its GPUs: they are not counted twice.
        adding = self.gpus_per_node.get(node, self.default_gpus) - sum(1 for t in alone if parse_target(t)[0] == node)
        if total + adding <= self.max_gpus:
            return None
        return (f"{'dry-run: WOULD BE REFUSED: ' if self.ctl.dry_run else ''}blast radius: {total} GPU(s) out of "
                f"service, {node} would add {adding}; max_unavailable_gpus is {self.max_gpus}; alerting instead "
                "of quarantining")

    # -- one event ------------------------------------------------------------------------
    def decide(self, event_id: int, event: FaultEvent, action: Action, payload: dict, escalated: str,
               nodes_out: list[str]) -> Decision | None:
        """Decide a GPU-scoped fault; None sends it down the node path (with `gpu_fallback`
        recorded in `payload` when the backend cannot take one GPU out)."""
        ctl, node, gpu = self.ctl, event.node, event.gpu
        why_not = self.isolation_refused(node)
        if why_not:
            payload.update(scope="node", gpu_fallback=f"{why_not}: the node is quarantined instead")
            return None
        payload.update(scope="gpu")
        name, dry = target(node, gpu), "dry-run: " if ctl.dry_run else ""
        if node in nodes_out:
            return ctl._decide(event_id, node, "already_quarantined", f"{dry}node is out of service already", payload)
        entry = gpu_state(ctl.store, node, gpu)
        if entry is not None and entry["state"] == "quarantining" and not ctl.dry_run:
            return self._quarantine(event_id, node, gpu, entry["reason"], payload, retry=True)
        if entry is not None or name in self._would:
            return ctl._decide(event_id, node, "already_quarantined", f"{dry}gpu {gpu} is out of service already",
                               payload)
        state = ctl.gate.breaker() if not ctl.dry_run else {}
        if state.get("open"):
            return ctl._defer(event_id, node, "refused_breaker_open", ctl.gate.admit(node, ctl.dry_run), payload)
        total, _ = self.count(nodes_out)
        if total + 1 > self.max_gpus:
            reason = (f"{'dry-run: WOULD BE REFUSED: ' if ctl.dry_run else ''}blast radius: {total} GPU(s) out of "
                      f"service, max_unavailable_gpus is {self.max_gpus}; alerting instead of taking {name} out")
            return ctl._defer(event_id, node, "refused_blast_radius", reason, payload, alert=True)
        refused = ctl.gate.admit(node, ctl.dry_run, ref=f"event {event_id}")
        if refused:
            return ctl._defer(event_id, node, "refused_breaker_open", refused, payload)
        what = f"XID {event.xid}" if event.xid is not None else event.kind.value.replace("_", " ")
        reason = f"{what} on gpu {gpu} asks for {action.value}{escalated}: gpu {gpu} out, the node keeps its other GPUs"
        if ctl.dry_run:
            self._would.append(name)
            ctl.gate.record(node, action.value, "failover", f"event {event_id}", dry_run=True)
            return ctl._decide(event_id, node, "would_quarantine_gpu", f"dry-run: would take {name} out ({reason})",
                               payload)
        return self._quarantine(event_id, node, gpu, reason, payload)

    def _quarantine(self, event_id: int, node: str, gpu: int, reason: str, payload: dict,
                    retry: bool = False) -> Decision:
        ctl, name = self.ctl, target(node, gpu)
        decided = None
        if not retry:
            decided = ctl.audit.append("failover.decision", reason, actor=ctl.actor, node=node,
                                       payload={**payload, "verdict": "quarantine_gpu"})
            with ctl.store.transaction():
                _put(ctl.store, name, {"node": node, "gpu": gpu, "state": "quarantining", "reason": reason,
                                       "event_id": event_id, "action": payload["action"], "at": time.time(),
                                       "scheduler": ctl.scheduler.name})
        if ctl._acts is not None:
            # In a batch: the intent commits with the batch, then the scheduler is called
            # (FailoverController._decide_batch), as for a node; a crash in between leaves the
            # intent for recover().
            ctl._acts.append((None, functools.partial(self._act, event_id, node, gpu, reason, payload, retry,
                                                      decided)))
            return Decision(node, "quarantine_gpu", reason, False, event_id,
                            decided_at=decided.ts if decided else time.time())
        return self._act(event_id, node, gpu, reason, payload, retry, decided)

    def _act(self, event_id: int, node: str, gpu: int, reason: str, payload: dict, retry: bool,
             decided) -> Decision:
        """Call the scheduler for a GPU quarantine whose intent is committed; record the outcome."""
        ctl, name = self.ctl, target(node, gpu)
        try:
            warning = ctl.scheduler.quarantine_gpu(node, gpu, reason, event=str(event_id))
        except Exception as exc:  # the intent stays (the GPU counts as out); the next poll retries
            return ctl._failed(event_id, node, f"taking {name} out through {ctl.scheduler.name} failed: {exc}; "
                               "the event stays pending and is retried", payload, exc)
        self._done(event_id, node, gpu, reason, warning, retry, decided.seq if decided else None)
        return Decision(node, "quarantine_gpu", reason, False, event_id,
                        decided_at=decided.ts if decided else time.time())

    def _done(self, event_id: int, node: str, gpu: int, reason: str, warning: str | None, retry: bool,
              decision_seq: int | None) -> None:
        ctl, name = self.ctl, target(node, gpu)
        for memo in (ctl._errors, ctl._retry_at, ctl._retry_backoff):
            memo.pop(event_id, None)
        said = f"{name} taken out through {ctl.scheduler.name}; {node} keeps its other GPUs in service"
        ctl.audit.append("failover.action", f"{said}; {warning}" if warning else said, actor=ctl.actor, node=node,
                         payload={"event_id": event_id, "scheduler": ctl.scheduler.name, "scope": "gpu", "gpu": gpu,
                                  "warning": warning, "retry": retry, "decision_seq": decision_seq})
        with ctl.store.transaction():
            entry = gpu_state(ctl.store, node, gpu) or {}
            _put(ctl.store, name, {**entry, "node": node, "gpu": gpu, "state": "quarantined", "reason": reason,
                                   "event_id": event_id, "at": time.time(), "scheduler": ctl.scheduler.name})
            ctl.store.mark_handled(event_id, "quarantine_gpu")
            ctl.gate.record(node, entry.get("action") or "unknown", "failover", f"event {event_id}")

    def recover(self) -> list[str]:
        """Finish GPU quarantines a previous run started (called with the node's recover())."""
        finished = []
        for name, entry in gpus_out(self.ctl.store).items():
            if entry["state"] != "quarantining" or self.ctl.dry_run:
                continue
            try:
                warning = self.ctl.scheduler.quarantine_gpu(entry["node"], entry["gpu"], entry["reason"],
                                                            event=str(entry["event_id"]))
            except Exception as exc:
                self.ctl.audit.append("failover.error", f"could not finish taking {name} out after restart: {exc}",
                                      actor=self.ctl.actor, node=entry["node"],
                                      payload={"resumed": True, "error": repr(exc), "gpu": entry["gpu"],
                                               "event_id": entry["event_id"]})
                continue
            self._done(entry["event_id"], entry["node"], entry["gpu"], entry["reason"], warning, True, None)
            finished.append(name)
        return finished

    # -- people ---------------------------------------------------------------------------
    def release(self, node: str, gpu: int, reason: str, actor: str, note: str | None = None) -> dict:
        """Return one GPU to service (an approver's decision, audited as theirs); refused for a
        repeat offender (aidc.failover.offenders)."""
        ctl, name = self.ctl, target(node, gpu)
        noted = {"note": note} if note else {}
        if not ctl.inventory.knows(node):
            said = f"{shown(node)} is not a node {ctl.scheduler.name} knows: release refused"
            ctl.refusals.refuse(node, "cli", actor, said)
            raise UnknownNode(said)
        refused = refusal(ctl.store, node, gpu)
        if refused:
            ctl.audit.append("failover.release_refused", refused, actor=actor, node=node,
                             payload={"gpu": gpu, "reason": reason, "repeat_offender": True, **noted})
            raise OffenderRefused(refused)
        if gpu_state(ctl.store, node, gpu) is None:
            raise OffenderRefused(f"{name} is not out of service on its own: nothing to release")
        if ctl.dry_run:
            ctl.audit.append("failover.release", f"dry-run: would return {name} to service ({reason})", actor=actor,
                             node=node, payload={"gpu": gpu, "dry_run": True, **noted})
            return {"target": name, "dry_run": True}
        warning = ctl.scheduler.release_gpu(node, gpu, reason)
        ctl.audit.append("failover.release", reason, actor=actor, node=node,
                         payload={"gpu": gpu, "scope": "gpu", "dry_run": False, "warning": warning, **noted})
        with ctl.store.transaction():
            _put(ctl.store, name, None)
            bump_capacity(ctl.store)
        return {"target": name, "released": True, "warning": warning}

    def _report(self, total: int) -> None:
        if self.ctl.metrics is not None and hasattr(self.ctl.metrics, "gpus_out"):
            self.ctl.metrics.gpus_out.set(total)
