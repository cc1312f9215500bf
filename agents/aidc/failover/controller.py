"""Failover: read fault events from the store, decide, and quarantine within policy.

The controller is the only stage that acts on faults (detectors never act). For each
pending event it decides one verdict and records it:

* `refused_unknown_node` the scheduler lists no node of that name (see below): nothing else is decided
* `refused_source`       the event's key names another node than the event (a node speaks
                         only for itself, aidc.failover.provenance): audit, don't act, don't count
* `no_action`            the fault's action keeps the node in service (e.g. restart_app)
* `already_quarantined`  the node is out of service already
* `refused_blast_radius` quarantining would exceed `policy.max_unavailable`: alert, don't act
* `refused_breaker_open` the circuit breaker is open, or this quarantine opened it (see
                         aidc.failover.remediation): audit, don't act
* `would_quarantine`     dry-run: what would have happened, audited, nothing changed
* `quarantine`           the node is taken out of service through the scheduler backend
* `quarantine_gpu`       a fault local to one GPU: that GPU alone is taken out, the node keeps
                         its other GPUs (`would_quarantine_gpu` in dry-run; backends that cannot
                         take the node instead, recorded as `gpu_fallback`): aidc.failover.gpu_quarantine

A node or GPU marked a repeat offender (aidc.failover.offenders) leaves service on any fault,
and `release` refuses it until an approver clears the mark.

The action comes from the catalog, escalated by aidc.failover.remediation (repeats of the same
fault on the same GPU, a node remediated too often), the gate the runbook engine shares.

The two refusals are not final: the event stays pending with its verdict recorded (audited
once per cause) and is decided again when capacity returns (aidc releases a node or a person
resets the breaker) and every `policy.deferred_recheck_s` otherwise, also after a restart; its
quarantine then happens once, as any other. In dry-run nothing returns capacity, so a refusal
is decided (marked dry-run) like any other verdict.

Crash safety: the intent (`quarantining`) is written before the scheduler is called and
the event is marked handled only after; a restarted controller finishes an interrupted
quarantine (the backend's calls are idempotent) and never acts twice on one event. Each
audit record is appended before the store commit it describes, so a crash in between
may repeat a record after the restart but never loses one. The loop does this per batch
(`_decide_batch`): up to BATCH decisions in one audit commit, then one store commit; the
batch's quarantines are then acted on, their intents already committed.

A scheduler that cannot be reached (slurmctld down) leaves the event pending and its intent
in place: it is retried on the next poll, audited once when it fails and once when it succeeds.

Names that are not nodes: an event for a name the scheduler does not list (aidc.nodenames) is
decided `refused_unknown_node` before anything else: no intent, no scheduler call, audited
once per window with the rest counted. An intent for such a name (a store written before this
check) is dropped, audited as `failover.intent_dropped`, and never counts as out of service.

Blast radius: with a backend that reports the cluster-wide out-of-service set (Slurm), the
count is the scheduler's truth plus this controller's intents in flight, so controllers on
different hosts agree; the lab counts the store's node states. `run()` acts only while it
holds the controller lease (aidc.failover.lease), so one controller acts at a time.

Fencing: a lease with a `fence(txn)` (aidc.failover.pg_lease, state in PostgreSQL) is checked
inside every store transaction that records an intent or a decision, so a controller that lost
the lease without noticing (paused, cut off) cannot record one: the transaction rolls back, the
batch stops (`failover.fenced`, audited) and the new leader decides the event.
"""

from __future__ import annotations

import contextlib
import threading
import time

from aidc.audit import AuditLog
from aidc.audit.log import default_actor
from aidc.errors import AidcError
from aidc.retry import Backoff, RetryPolicy
from aidc.events import Action, Decision, FaultEvent, FaultKind
from aidc.failover.gpu_quarantine import GpuQuarantine
from aidc.failover.leader import NotLeader
from aidc.failover.offenders import OffenderRefused, Offenders
from aidc.failover.offenders import refusal as offender_refusal
from aidc.failover.provenance import REFUSED_SOURCE, key_node
from aidc.failover.remediation import CAPACITY_KEY, RemediationGate, bump_capacity
from aidc.failover.scheduler import SchedulerBackend
from aidc.nodenames import NodeInventory, RefusalLog, UnknownNode, shown, spec_inventory
from aidc.spec import ClusterSpec
from aidc.store import Store

OUT_OF_SERVICE = ("quarantining", "quarantined")
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 30.0
EVENT_RETRY = RetryPolicy(attempts=None, base_s=RETRY_FIRST_S, cap_s=RETRY_MAX_S)  # no limit: the event waits
# Events decided in one commit (one audit fsync and anchor update, one store commit). Larger
# batches amortise more but hold the store's write lock longer (the listener waits on it) and
# delay the commit of the batch's first decision.
BATCH = 500


class FailoverController:
    def __init__(self, spec: ClusterSpec, store: Store, audit: AuditLog, scheduler: SchedulerBackend,
                 dry_run: bool | None = None, actor: str | None = None, metrics=None, catalog=None):
        self.spec, self.store, self.audit, self.scheduler = spec, store, audit, scheduler
        self.dry_run = spec.policy.dry_run if dry_run is None else dry_run
        self.actor = actor or default_actor("failover")
        self.metrics = metrics
        self.probe = None  # an aidc.probes.Probe: each loop turn is reported to /healthz and /readyz
        self.gate = RemediationGate(spec, store, audit, catalog=catalog, metrics=metrics, actor=self.actor)
        self.gate.refresh_metrics()
        # The spec's node names, once: the blast radius reads them for every fatal event, and
        # listing 100,000 nodes per decision made the cost of a decision grow with the fleet.
        self.spec_names = frozenset(n.name for n in spec.nodes())
        self.total_nodes = len(self.spec_names)
        # Repeat offenders (policy.offenders) and one-GPU quarantines: aidc.failover.offenders,
        # aidc.failover.gpu_quarantine.
        self.offenders = Offenders(spec, store, audit, self.gate.catalog, metrics=metrics, actor=self.actor)
        self.offenders.refresh_metrics()
        self.inventory = NodeInventory(lambda: spec_inventory(scheduler, spec))
        self.refusals = RefusalLog(audit, self.actor)
        self.max_unavailable = spec.policy.max_unavailable_nodes(self.total_nodes)
        # Dry-run changes no node state, so the nodes it would have quarantined are kept here
        # to decide later events as a real run would (already out, blast radius). This run
        # only: a restarted dry-run starts from the store's node states again.
        self._would_quarantine: list[str] = []
        # The last error audited per pending event, so a scheduler that stays down for an hour
        # gives one record per event, not one per poll.
        self._errors: dict[int, str] = {}
        # A failed event is retried with capped exponential backoff, not on every 50 ms poll:
        # an API server that is down is not hammered by every pending event.
        self._retry_at: dict[int, float] = {}
        self._retry_backoff: dict[int, Backoff] = {}
        # Events refused for capacity are decided again (a full pass) when the store's capacity
        # counter moves, and every policy.deferred_recheck_s (monotonic); the polls between
        # read only undecided events, so a thousand waiting events cost nothing per poll.
        self._recheck_due = 0.0
        self._capacity_seen: str | None = None
        # Whether the last poll held the lease, and the last lease error audited (once per cause).
        self._held = False
        self._lease_error: str | None = None
        # The lease's fencing check, run inside each recording transaction (None: no fencing).
        self.fence = None
        self.wall_clock = time.time  # the store's clock: events' created_at
        # Set by whoever stores new events in this process (the HTTPS listener, after its commit):
        # the loop decides them at once instead of at its next poll.
        self.wake = threading.Event()
        # Within a batch (_decide_batch): the quarantines whose intents wait for the batch's
        # commit before the scheduler is called, and the scheduler's out-of-service set, read once.
        self._acts: list | None = None
        self._wide: list[str] | None = None
        self._out: list[str] | None = None
        self._more = False  # the last look found a full batch: look again without waiting
        # Held while a batch writes. The listener in this process takes the same lock around its
        # commits (aidc failover run), so the two writers queue here, woken at once, instead of
        # in SQLite's busy handler, which sleeps in growing steps of up to 100 ms.
        self.write_lock = threading.Lock()
        self.gpus = GpuQuarantine(self)

    # -- the loop ---------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish quarantines a previous run started but did not record as done.

        A node whose quarantine fails again is audited and left `quarantining` (still counted
        out of service), so one node the scheduler cannot handle does not stop the others' events.
        """
        finished = []
        for node in self.store.nodes_in_state("quarantining"):
            event_id = self._intent_event(node)
            try:
                known = self.inventory.knows(node)
            except Exception as exc:
                self.audit.append("failover.error", f"could not read the scheduler's nodes after restart: {exc}",
                                  actor=self.actor, node=node,
                                  payload={"resumed": True, "error": repr(exc), "event_id": event_id})
                continue
            if not known:
                if not self.dry_run:
                    self._drop_intent(node, event_id)
                continue
            if self.dry_run:
                self.audit.append("failover.decision", "dry-run: would finish the quarantine a previous run started",
                                  actor=self.actor, node=node,
                                  payload={"resumed": True, "dry_run": True, "verdict": "would_quarantine",
                                           "event_id": event_id})
                continue
            try:
                warning = self.scheduler.quarantine(node, "resumed after controller restart",
                                                    event=None if event_id is None else str(event_id))
            except Exception as exc:
                self.audit.append("failover.error", f"could not finish the quarantine after restart: {exc}",
                                  actor=self.actor, node=node,
                                  payload={"resumed": True, "error": repr(exc), "event_id": event_id})
                continue
            self.audit.append("failover.action", _with_warning("quarantine completed after restart", warning),
                              actor=self.actor, node=node,
                              payload={"resumed": True, "warning": warning, "event_id": event_id,
                                       "scheduler": self.scheduler.name})
            with self._fenced():
                self.store.set_node_state(node, "quarantined", "resumed after controller restart", self.actor)
                if event_id is not None:
                    self.store.mark_handled(event_id, "quarantine")
                    self.gate.record(node, self.store.get(f"intent_action:{node}") or "unknown", "failover",
                                     f"event {event_id}")
            finished.append(node)
        return finished + self.gpus.recover()

    def run_once(self, may_act=None, backoff: bool = False) -> list[Decision]:
        """Decide every pending event; `may_act` (the lease's `held`) is asked before each one,
        so a controller whose lease lapsed mid-batch stops at once. With `backoff` (the loop),
        an event whose last try failed waits out its backoff; a direct call tries them all now."""
        decisions = []
        now = time.monotonic()
        capacity = self.store.get(CAPACITY_KEY)
        full = not backoff or capacity != self._capacity_seen or now >= self._recheck_due
        if full:  # a release or a breaker reset, or time for the periodic look: deferred events too
            self._capacity_seen = capacity
            self._recheck_due = now + self.spec.policy.deferred_recheck_s
        self.gate.refresh_metrics()  # a reset comes from another process (the CLI)
        self.refusals.flush(expired_only=True)
        limit = 1000 if full else BATCH
        rows = self.store.pending(limit=limit, undecided_only=not full)
        todo = [(i, e) for i, e in rows if not (backoff and self._retry_at.get(i, 0.0) > now)]
        # Look again at once only if this look had work: a full page of events that all wait out
        # their backoff (a scheduler down) must not spin the loop.
        self._more = len(rows) == limit and bool(todo)
        for first in range(0, len(todo), BATCH):
            batch, decided = todo[first:first + BATCH], len(decisions)
            try:
                if not self._decide_batch(batch, may_act, decisions):
                    break
            except NotLeader as exc:  # fenced: the lease moved on; nothing of this batch was recorded
                del decisions[decided:]
                self.audit.append("failover.fenced", f"{exc}; this controller stops acting", actor=self.actor,
                                  node=batch[0][1].node, payload={"event_id": batch[0][0],
                                                                  "event_ids": [event_id for event_id, _ in batch]})
                break
        return decisions

    def _decide_batch(self, batch: list[tuple[int, FaultEvent]], may_act, decisions: list[Decision]) -> bool:
        """Decide `batch` in one store transaction and one audit batch, the audit log committed
        first (a record is durable before the state it describes); then call the scheduler for
        the quarantines it decided, each after its intent is committed. False when the lease
        was lost (the rest waits for whoever holds it; an intent left is finished by recover())."""
        self._acts, self._wide, self._out, held = [], None, None, True
        try:
            with self.write_lock, self.store.transaction(), self.audit.batch():
                for event_id, event in batch:
                    if may_act is not None and not may_act():
                        held = False
                        break
                    waiting = len(self._acts)
                    decisions.append(self.handle(event_id, event))
                    if len(self._acts) > waiting:
                        self._acts[-1] = (len(decisions) - 1, self._acts[-1][1])
        finally:
            acts, self._acts, self._wide, self._out = self._acts, None, None, None
        if not acts:
            return held
        # The batch's quarantines, their records in one audit commit before one store commit.
        # A crash before these commits leaves the intents, which recover() finishes (the
        # scheduler's calls are idempotent), as after a crash in any single quarantine.
        with self.write_lock, self.store.transaction(), self.audit.batch():
            for index, args in acts:
                if may_act is not None and not may_act():
                    return False
                # A node's quarantine (arguments of _act), or another path's deferred act (a GPU's).
                decisions[index] = args() if callable(args) else self._act(*args)
        return held

    def run(self, stop: threading.Event, poll_s: float = 0.05, lease=None) -> None:
        """Act on events until `stop`; with a `lease`, only while holding it (one controller acts)."""
        self._held = lease is None
        if self._held:
            self.recover()
        while not stop.is_set():
            self.poll(lease)
            if self.probe is not None:
                # Store and audit open, the loop turning: ready, leader or standby alike (a
                # standby takes over when the leader stops, so it belongs behind the Service too).
                self.probe.ready()
                self.probe.turned(leader=self._held)
            if not self._more:  # a backlog is decided batch after batch; otherwise wait for news
                self.wake.wait(poll_s)
            self.wake.clear()
        self.refusals.flush()
        if lease is not None and self._held:
            lease.release()

    def poll(self, lease=None) -> bool:
        """One turn of the loop: hold or contend for the lease (audited when that changes), decide
        pending events while holding it, and report both to the metrics. True while holding."""
        self.fence = getattr(lease, "fence", None)
        if lease is None:
            self._held = True
        else:
            try:
                now_held, error = lease.hold(), None
            except Exception as exc:  # an unusable lease (directory, API server): not knowing means not acting
                now_held, error = False, str(exc)
            if error != self._lease_error:
                self._lease_error = error
                if error is not None:
                    self.audit.append("failover.lease_error", f"cannot use the controller lease: {error}",
                                      actor=self.actor, payload={**lease.describe(), "error": error})
            if now_held != self._held:
                self._held = now_held
                self.audit.append("failover.lease", f"controller lease {'acquired' if now_held else 'lost'}",
                                  actor=self.actor, payload=lease.describe())
                if now_held:
                    # The previous holder may have died between a drain and its record.
                    try:
                        self.recover()
                    except NotLeader as exc:  # fenced already: the next poll contends again
                        self.audit.append("failover.fenced", f"{exc}; recovery stopped", actor=self.actor,
                                          payload=lease.describe())
        if self._held:
            self.run_once(lease.held if lease is not None else None, backoff=True)
        self._report()
        return self._held

    def _report(self) -> None:
        if self.metrics is None:
            return
        self.metrics.lease(self._held)
        oldest = self.store.oldest_undecided_at()
        self.metrics.undecided_age(0.0 if oldest is None else self.wall_clock() - oldest)

    @contextlib.contextmanager
    def _fenced(self):
        """A store transaction that records what this controller decided or did, with the
        lease's fencing token checked inside it (aidc.failover.pg_lease): deposed, it rolls back."""
        with self.store.transaction() as txn:
            if self.fence is not None:
                self.fence(txn)
            yield txn

    # -- one event ----------------------------------------------------------------
    def handle(self, event_id: int, event: FaultEvent) -> Decision:
        node = event.node
        try:
            known = self.inventory.knows(node)
        except Exception as exc:
            return self._failed(event_id, node, f"cannot read the nodes of {self.scheduler.name}: {exc}; the event "
                                "stays pending and is retried", {"event_id": event_id, "dry_run": self.dry_run}, exc)
        if not known:
            return self._refuse_unknown(event_id, node)
        key = self.store.event_key(event_id)
        source = key_node(key) if key else None
        if source != node:
            # Checked before the escalation gate and the blast radius read the event (a name the
            # scheduler does not know is refused as such first: its key need not parse).
            reason = f"the event's source {source!r} is not node {node!r}: a node speaks only for itself; nothing done"
            return self._decide(event_id, node, REFUSED_SOURCE, reason,
                                {"event_id": event_id, "key": key, "source": source, "kind": event.kind.value,
                                 "xid": event.xid, "gpu": event.gpu, "dry_run": self.dry_run})
        action, escalation = self.gate.action_for(event_id, event, self.dry_run)
        payload = {"event_id": event_id, "kind": event.kind.value, "action": action.value,
                   "xid": event.xid, "gpu": event.gpu, "pci": event.pci, "line": event.line,
                   "observed_at": event.observed_at, "dry_run": self.dry_run}
        escalated = ""
        if escalation is not None:
            payload.update(catalog_action=event.action.value, escalation_rule=escalation.rule)
            escalated = f" (escalated from {escalation.from_action}: {escalation.rule})"
        if event.kind == FaultKind.STRAGGLER and self.spec.policy.stragglers.action == "alert":
            # A slow node costs the job a little on every step; taking it out costs a restart.
            # By default people decide (policy.stragglers.action: quarantine lets failover act).
            reason = f"straggler, policy.stragglers.action is alert: node stays in service ({event.message})"
            self.audit.append("failover.alert", reason, actor=self.actor, node=node, payload=payload)
            return self._decide(event_id, node, "no_action", reason, payload)
        mark = self.offenders.observe(event_id, event, self.dry_run)
        if mark is not None:
            payload["repeat_offender"] = mark["target"]
            if action.value not in self.spec.policy.out_of_service_actions:
                # Marked for repair: an offender is not left in service by a mild fault.
                action = Action.CONTACT_SUPPORT
                payload["action"] = action.value
                escalated += f" (repeat offender {mark['target']}: out for repair)"
        if action.value not in self.spec.policy.out_of_service_actions:
            return self._decide(event_id, node, "no_action",
                                f"{event.kind.value} asks for {action.value}{escalated}: node stays in service",
                                payload)
        acting = self._acts is not None and any(not callable(args) and args[1] == node for _, args in self._acts)
        if not self.dry_run and not acting and self.store.node_state(node) == "quarantining":
            # An earlier attempt wrote the intent and then failed (scheduler unreachable): finish it.
            # (Not an intent of this batch: that one is acted on when the batch commits.)
            return self._quarantine(event_id, node, self.store.get(f"intent_reason:{node}") or "retried quarantine",
                                    payload, retry=True)
        try:
            unavailable = self._unavailable()
        except Exception as exc:
            return self._failed(event_id, node, f"cannot read the out-of-service nodes from {self.scheduler.name}: "
                                f"{exc}; the event stays pending and is retried", payload, exc)
        unavailable = unavailable + [n for n in self._would_quarantine if n not in unavailable]
        if self.gpus.applies(event, action):  # the fault stays in one GPU: take that GPU out, where possible
            decided = self.gpus.decide(event_id, event, action, payload, escalated, unavailable)
            if decided is not None:
                return decided
        # In dry-run the nodes it would have quarantined count as out: "would be", not "are".
        dry = "dry-run: " if self.dry_run else ""
        if node in unavailable:
            return self._decide(event_id, node, "already_quarantined", f"{dry}node is out of service already",
                                payload)
        state = self.gate.breaker() if not self.dry_run else {}
        if state.get("open"):  # checked first: an open breaker needs no scheduler count to refuse
            return self._defer(event_id, node, "refused_breaker_open", self.gate.admit(node, self.dry_run), payload)
        if len(unavailable) + 1 > self.max_unavailable:
            # Under dry-run the refusal is said as one ("WOULD BE REFUSED"), never as a plan to act.
            reason = (f"{'dry-run: WOULD BE REFUSED: ' if self.dry_run else ''}blast radius: {len(unavailable)} node(s) out of service"
                      f" ({_some(unavailable)}), max_unavailable is {self.max_unavailable};"
                      " alerting instead of quarantining")
            return self._defer(event_id, node, "refused_blast_radius", reason, payload, alert=True)
        too_many_gpus = self.gpus.node_refusal(node, unavailable)
        if too_many_gpus:
            return self._defer(event_id, node, "refused_blast_radius", too_many_gpus, payload, alert=True)
        refusal = self.gate.admit(node, self.dry_run, ref=f"event {event_id}")
        if refusal:
            return self._defer(event_id, node, "refused_breaker_open", refusal, payload)
        what = f"XID {event.xid}" if event.xid is not None else event.kind.value.replace("_", " ")
        reason = f"{what} on gpu {event.gpu} asks for {action.value}{escalated}"
        if self.dry_run:
            decision = self._decide(event_id, node, "would_quarantine", f"dry-run: would quarantine ({reason})",
                                    payload)
            self._would_quarantine.append(node)
            self.gate.record(node, action.value, "failover", f"event {event_id}", dry_run=True)
            return decision
        return self._quarantine(event_id, node, reason, payload)

    def _defer(self, event_id: int, node: str, verdict: str, reason: str, payload: dict,
               alert: bool = False) -> Decision:
        """A refusal for capacity. Live: the event stays pending with its verdict recorded (audited
        once per cause, also across restarts) and is decided again when capacity returns. Dry-run:
        decided like any verdict, since nothing a dry-run does returns capacity."""
        if self.dry_run:
            if alert:
                self.audit.append("failover.alert", reason, actor=self.actor, node=node, payload=payload)
            return self._decide(event_id, node, verdict, reason, payload)
        if self.store.outcome(event_id) != verdict:
            if alert:
                self.audit.append("failover.alert", reason, actor=self.actor, node=node, payload=payload)
            self.audit.append("failover.decision", f"{reason}; the event stays pending until capacity returns",
                              actor=self.actor, node=node, payload={**payload, "verdict": verdict, "deferred": True})
            with self._fenced():
                self.store.mark_deferred(event_id, verdict)
        return Decision(node, verdict, reason, False, event_id)

    def _decide(self, event_id: int, node: str, verdict: str, reason: str, payload: dict) -> Decision:
        self.audit.append("failover.decision", reason, actor=self.actor, node=node,
                          payload={**payload, "verdict": verdict})
        with self._fenced():
            self.store.mark_handled(event_id, verdict)
        return Decision(node, verdict, reason, self.dry_run, event_id)

    def _unavailable(self) -> list[str]:
        """Nodes out of service: the scheduler's cluster-wide truth when it has one (plus this
        controller's intents in flight), else the store's node states. Within a batch it is
        read once and kept up to date by the batch's own intents (_quarantine, _drop_intent):
        a storm's every refusal re-reading it made a batch's cost grow with the storm."""
        if self._acts is not None and self._out is not None:
            return self._out
        out = self._read_unavailable()
        if self._acts is not None:
            self._out = out
        return out

    def _read_unavailable(self) -> list[str]:
        wide = getattr(self.scheduler, "out_of_service", None)
        # A name the scheduler does not list is no node out of service (an intent a store holds
        # from before names were checked would otherwise use up the blast radius for good).
        in_flight = [n for n in self.store.nodes_in_state("quarantining") if self.inventory.knows(n)]
        if wide is None:
            return [n for n in self.store.nodes_in_state(*OUT_OF_SERVICE) if self.inventory.knows(n)]
        if self._wide is None:  # once per batch: a scheduler round trip (scontrol, the API server)
            out = wide()
            self._wide = list(out if getattr(self.scheduler, "reports_only_managed_nodes", False)
                              else set(out) & self.spec_names)
        # Kubernetes: node names are the cluster's (hostnames), not the spec's derived names; the
        # backend counts only nodes of aidc's pools (label aidc.dev/pool). Other backends: the
        # spec's nodes. Outside a batch (a direct handle()) the read is not kept.
        out_of_service = self._wide
        if self._acts is None:
            self._wide = None
        return sorted(set(out_of_service) | set(in_flight))

    def _refuse_unknown(self, event_id: int, node: str) -> Decision:
        """Not a node of this scheduler: decided at once, never an intent (audited, aggregated)."""
        reason = f"{shown(node)} is not a node {self.scheduler.name} knows: event refused"
        self.refusals.refuse(node, "failover", f"event {event_id}", reason)
        if not self.dry_run and self.store.node_state(node) == "quarantining":
            self._drop_intent(node, event_id)
        with self._fenced():
            self.store.mark_handled(event_id, "refused_unknown_node")
        return Decision(node, "refused_unknown_node", reason, self.dry_run, event_id)

    def _drop_intent(self, node: str, event_id: int | None) -> None:
        """An intent for a name the scheduler does not list can never be finished: drop it."""
        self._out = None  # the batch's out-of-service list is read again
        self.audit.append("failover.intent_dropped", f"intent for {shown(node)} dropped: not a node "
                          f"{self.scheduler.name} knows", actor=self.actor,
                          payload={"name": shown(node), "event_id": event_id})
        with self._fenced():
            self.store.set_node_state(node, "unknown_node", "not a node the scheduler knows", self.actor)
            for key in ("intent_event", "intent_reason", "intent_action"):
                self.store.delete(f"{key}:{node}")
            if event_id is not None:
                self.store.mark_handled(event_id, "refused_unknown_node")

    def _intent_event(self, node: str) -> int | None:
        value = self.store.get(f"intent_event:{node}")
        return int(value) if value else None

    def _quarantine(self, event_id: int, node: str, reason: str, payload: dict, retry: bool = False) -> Decision:
        if retry:
            decided = None
        else:
            decided = self.audit.append("failover.decision", reason, actor=self.actor, node=node,
                                        payload={**payload, "verdict": "quarantine"})
            with self._fenced():
                self.store.set_node_state(node, "quarantining", reason, self.actor)
                self.store.put(f"intent_event:{node}", str(event_id))
                self.store.put(f"intent_reason:{node}", reason)
                self.store.put(f"intent_action:{node}", payload["action"])
                if self._acts is not None:
                    # The breaker counts it from its intent: the batch's next decisions must see
                    # it (recorded once per event: the record after the act changes nothing).
                    self.gate.record(node, payload["action"], "failover", f"event {event_id}")
        if self._acts is not None:
            # In a batch: the intent commits with the batch, and only then is the scheduler called
            # (_decide_batch). Counted out of service meanwhile: its node state is quarantining.
            self._acts.append((None, (event_id, node, reason, payload, retry, decided)))
            if self._out is not None and node not in self._out:
                self._out = sorted(self._out + [node])
            return Decision(node, "quarantine", reason, False, event_id,
                            decided_at=decided.ts if decided else time.time())
        return self._act(event_id, node, reason, payload, retry, decided)

    def _act(self, event_id: int, node: str, reason: str, payload: dict, retry: bool, decided) -> Decision:
        """Call the scheduler for a quarantine whose intent is committed, and record the outcome."""
        started = time.monotonic()
        try:
            warning = self.scheduler.quarantine(node, reason, event=str(event_id))
        except Exception as exc:
            # The intent stays: the node counts as out, and the next poll retries the call.
            return self._failed(event_id, node, f"quarantine through {self.scheduler.name} failed: {exc}; "
                                "the event stays pending and is retried", payload, exc)
        took_ms = (time.monotonic() - started) * 1000
        self._errors.pop(event_id, None)
        self._retry_at.pop(event_id, None)
        self._retry_backoff.pop(event_id, None)
        self.audit.append("failover.action", _with_warning(f"quarantined through {self.scheduler.name}", warning),
                          actor=self.actor, node=node,
                          payload={"event_id": event_id, "scheduler": self.scheduler.name, "warning": warning,
                                   "duration_ms": round(took_ms, 1), "retry": retry,
                                   "decision_seq": decided.seq if decided else None})
        with self._fenced():
            self.store.set_node_state(node, "quarantined", reason, self.actor)
            self.store.mark_handled(event_id, "quarantine")
            self.gate.record(node, payload["action"], "failover", f"event {event_id}")
        return Decision(node, "quarantine", reason, False, event_id,
                        decided_at=decided.ts if decided else time.time())

    def _failed(self, event_id: int, node: str, reason: str, payload: dict, exc: Exception) -> Decision:
        """Audit a failure once per event (not on every poll), leave the event pending, back off."""
        delay = self._retry_backoff.setdefault(event_id, Backoff(EVENT_RETRY)).failed()
        self._retry_at[event_id] = time.monotonic() + delay
        if self._errors.get(event_id) != str(exc):
            self._errors[event_id] = str(exc)
            self.audit.append("failover.error", reason, actor=self.actor, node=node,
                              payload={**payload, "error": str(exc), "retried": True})
        return Decision(node, "error", reason, self.dry_run, event_id)

    # -- humans -------------------------------------------------------------------
    def release(self, node: str, reason: str, actor: str, note: str | None = None) -> dict | None:
        """Return a node to service (an operator's decision, recorded as theirs: `actor` is the
        authenticated identity, `note` a self-asserted name kept beside it).

        Returns the backend's decision (Slurm: released / not_drained); a refusal (Slurm: a node
        an operator or Slurm drained or downed) is audited as `failover.release_refused` and raised.
        """
        noted = {"note": note} if note else {}
        if not self.inventory.knows(node):
            reason = f"{shown(node)} is not a node {self.scheduler.name} knows: release refused"
            self.refusals.refuse(node, "cli", actor, reason)
            raise UnknownNode(reason)
        refused = offender_refusal(self.store, node)
        if refused:  # recertification does not return a repeat offender (aidc.failover.offenders)
            self.audit.append("failover.release_refused", refused, actor=actor, node=node,
                              payload={"dry_run": self.dry_run, "reason": reason, "repeat_offender": True, **noted})
            raise OffenderRefused(refused)
        if self.dry_run:
            self.audit.append("failover.release", f"dry-run: would release ({reason})", actor=actor, node=node,
                              payload={"dry_run": True, **noted})
            return None
        try:
            decision = self.scheduler.release(node, reason)
        except AidcError as exc:
            refused = getattr(exc, "decision", None)
            self.audit.append("failover.release_refused", str(exc), actor=actor, node=node,
                              payload={"dry_run": False, "reason": reason, **noted,
                                       "decision": refused.to_dict() if refused else None})
            raise
        described = decision.to_dict() if hasattr(decision, "to_dict") else None
        self.audit.append("failover.release", reason, actor=actor, node=node,
                          payload={"dry_run": False, "decision": described, **noted})
        with self.store.transaction():
            self.store.set_node_state(node, "in_service", reason, actor)
            bump_capacity(self.store)  # events deferred for capacity are decided again now
        return described


def _some(names: list[str], shown_at_most: int = 20) -> str:
    """Names for a sentence, at most `shown_at_most` of them: a storm's refusals would otherwise
    each carry the whole out-of-service list into the audit log."""
    if not names:
        return "-"
    rest = len(names) - shown_at_most
    return ", ".join(names[:shown_at_most]) + (f" and {rest} more" if rest > 0 else "")


def _with_warning(reason: str, warning: str | None) -> str:
    return f"{reason}; {warning}" if warning else reason
