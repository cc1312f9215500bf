"""The runbook engine: turns an alert into at most one run per node, and drives a run's
steps to completion, durably, with guards and an audit record for every step.

Safety rules, in the order they are applied:
1. Intake deduplicates by alert fingerprint (+ startsAt) and by runbook state (an active
   run or a recent run of the same runbook on the node), and takes the node's lock.
2. Guards are checked before the first step; blast radius (`policy.max_unavailable`) is
   checked again, atomically with the intent record, before every quarantine.
3. A destructive step runs only after an approved `approve` step, or when its kind is in
   `policy.runbook_auto_approve`.
4. A step's intent (`running`) is written before it acts. After a crash, a step found
   `running` is reconciled: quarantine/release check the scheduler's state, playbook and
   burn-in are marked failed (outcome unknown) and never repeated, the rest re-run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from aidc.audit.log import AuditLog, default_actor
from aidc.errors import AidcError
from aidc.runbook.actuators import Actuators
from aidc.runbook.catalog import Catalog, Runbook, RunbookError, Step
from aidc.runbook import state as run_state
from aidc.runbook.state import ACTIVE, RunRow, RunState, StepRow, owner_alive
from aidc.runbook.steps import ACTIONS, Interrupted, StepContext, describe, scheduler_state, step_params
from aidc.spec import Policy


@dataclass(frozen=True)
class Submission:
    outcome: str  # started | duplicate | cooldown | node_busy | unmatched | no_node | unknown_node | resolved
    reason: str
    runbook: str | None = None
    node: str | None = None
    run_id: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PlannedStep:
    idx: int
    id: str
    kind: str
    phase: str
    destructive: bool
    would: str
    gate: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Engine:
    catalog: Catalog
    state: RunState
    audit: AuditLog
    actuators: Actuators
    nodes: list[str]
    policy: Policy = field(default_factory=Policy)
    actor: str = field(default_factory=lambda: default_actor("runbook"))
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # AuditLog keeps one connection; executor threads take turns on it.
        self._audit_lock = threading.Lock()

    def _audit(self, kind: str, reason: str, node: str | None, payload: dict) -> None:
        with self._audit_lock:
            self.audit.append(kind, reason, actor=self.actor, node=node, payload=payload)

    # --- intake -------------------------------------------------------------------------
    def submit_alert(self, alert: dict, sender: dict | None = None) -> Submission:
        """One alert from an Alertmanager webhook: match, deduplicate, start at most one run.

        `sender` (address, verified client certificate) goes into the audited trigger."""
        labels = alert.get("labels") or {}
        if alert.get("status") == "resolved":
            return Submission("resolved", "resolved notifications start nothing")
        rb = self.catalog.match(labels)
        if rb is None:
            return Submission("unmatched", f"no runbook for alert {labels.get('alertname')!r}")
        node = labels.get(rb.node_label)
        if not node:
            return Submission("no_node", f"alert has no {rb.node_label!r} label naming the node", rb.name)
        fingerprint = str(alert.get("fingerprint") or _label_fingerprint(labels))
        trigger = {"source": "alertmanager", "alertname": labels.get("alertname"), "labels": labels,
                   "fingerprint": fingerprint, "startsAt": alert.get("startsAt")}
        if sender:
            trigger["sender"] = sender
        return self.submit(rb.name, node, trigger, fingerprint, str(alert.get("startsAt", "")))

    def submit(self, runbook: str, node: str, trigger: dict, fingerprint: str | None = None,
               starts_at: str = "") -> Submission:
        rb = self.catalog.get(runbook)
        if node not in self.nodes:
            return Submission("unknown_node", f"{node!r} is not a node of this cluster", rb.name, node)
        with self.state.transaction() as db:
            if fingerprint:
                seen = self.state.alert_seen(db, fingerprint, starts_at)
                if seen is not False:
                    return Submission("duplicate", "alert already handled (same fingerprint and start)",
                                      rb.name, node, seen)
            active = self.state.active_run(db, rb.name, node)
            if active is not None:
                if fingerprint:
                    self.state.record_alert(db, fingerprint, starts_at, active)
                return Submission("duplicate", f"run {active} of {rb.name} on {node} is still active",
                                  rb.name, node, active)
            last = self.state.last_finished(db, rb.name, node)
            if last and time.time() - last[1] < rb.cooldown_s:
                if fingerprint:
                    self.state.record_alert(db, fingerprint, starts_at, last[0])
                return Submission("cooldown", f"run {last[0]} of {rb.name} on {node} finished "
                                  f"{time.time() - last[1]:.0f} s ago (cooldown {rb.cooldown_s:g} s)",
                                  rb.name, node, last[0])
            holder = self.state.lock_holder(db, node)
            if holder is not None:
                # Not recorded as seen: Alertmanager's next repeat may start it once the node is free.
                return Submission("node_busy", f"{node} is locked by run {holder}", rb.name, node, holder)
            run_id = self.state.create_run(db, rb.name, node, trigger, [(s.id, s.kind) for s in rb.steps])
            if fingerprint:
                self.state.record_alert(db, fingerprint, starts_at, run_id)
        self._audit("runbook.run.started", f"{rb.name} on {node}", node,
                    {"run_id": run_id, "runbook": rb.name, "trigger": trigger})
        return Submission("started", "new run", rb.name, node, run_id)

    # --- execution ----------------------------------------------------------------------
    def runnable(self) -> list[int]:
        """Active runs that no live process is executing (after a crash or an approval)."""
        return [r.id for r in self.state.runs(status=ACTIVE) if not owner_alive(r.owner, r.updated_at)]

    def execute(self, run_id: int) -> RunRow:
        """Drive a run until it finishes, waits for a human, or the engine stops."""
        if not self.state.claim(run_id):
            return self.state.get_run(run_id)
        # Renew the run's lease while driving it: an executor on another host takes a run
        # over only when its lease has expired (the executor died with its host or pod).
        driving = threading.Event()
        lease = threading.Thread(target=self._renew_lease, args=(run_id, driving), daemon=True,
                                 name=f"lease-{run_id}")
        lease.start()
        try:
            self._drive(run_id)
        except Interrupted:
            pass
        finally:
            driving.set()
            lease.join(timeout=5)
            self.state.disown(run_id)
        return self.state.get_run(run_id)

    def _renew_lease(self, run_id: int, done: threading.Event) -> None:
        while not done.wait(run_state.LEASE_S / 3):
            try:
                self.state.renew(run_id)
            except Exception:  # a busy database delays a renewal; the next one comes soon
                pass

    def _drive(self, run_id: int) -> None:
        run = self.state.get_run(run_id)
        rows = self.state.steps(run_id)
        try:
            rb = self.catalog.get(run.runbook)
            changed = _definition_changed(rb, rows)
        except RunbookError as exc:
            rb, changed = None, str(exc)
        if changed:
            # Never map recorded steps onto a different definition: a step could run twice or
            # be skipped. Finish the run (releasing the node's lock) and leave it to a human.
            self._abandon(run, f"runbook {run.runbook!r} changed since run {run_id} started ({changed}); "
                               "the run is not resumed: check the node and start a new run")
            return
        variables = {**run.trigger.get("labels", {}), "node": run.node, "runbook": rb.name, "run_id": run_id}
        if all(r.status == "pending" for r in rows if r.phase == "main") and run.status == "pending":
            refusal = self._guards(rb, run)
            if refusal:
                # A refused guard fails the run, whatever the first step's on_failure says.
                self._fail_step(run, rb, rows[0], {"error": f"guard refused: {refusal}", "refused": "guard"}, 0.0)
        for _ in range(4 * (len(rb.steps) + len(rb.on_failure)) + 4):  # bounded: each pass settles a step
            rows = self.state.steps(run_id)
            row, failed = _next_row(rows, rb)
            if row is None:
                break
            if row.phase == "main" and time.time() > run.created_at + rb.timeout_s:
                self._fail_step(run, rb, row, {"error": f"run timed out after {rb.timeout_s:g} s"}, 0.0)
                continue
            if self._run_step(run, rb, row, variables) == "waiting":
                self.state.set_run_status(run_id, "awaiting_approval")
                return
        rows = self.state.steps(run_id)
        _, failed = _next_row(rows, rb)
        first_bad = next((r for r in rows if r.status == "failed" and r.phase == "main"), None)
        error = (first_bad.result or {}).get("error") if first_bad else None
        status = "failed" if failed else "done"
        self.state.set_run_status(run_id, status, error)
        self._audit("runbook.run.finished", f"{rb.name} on {run.node}: {status}", run.node,
                    {"run_id": run_id, "runbook": rb.name, "status": status, "error": error,
                     "duration_s": round(time.time() - run.created_at, 3)})

    def _abandon(self, run: RunRow, error: str) -> None:
        self.state.set_run_status(run.id, "failed", error)
        self._audit("runbook.run.finished", f"{run.runbook} on {run.node}: failed", run.node,
                    {"run_id": run.id, "runbook": run.runbook, "status": "failed", "error": error,
                     "duration_s": round(time.time() - run.created_at, 3)})

    def _guards(self, rb: Runbook, run: RunRow) -> str | None:
        for guard in rb.guards:
            kind = guard["guard"]
            if kind == "node_known" and run.node not in self.nodes:
                return f"{run.node} is not a node of this cluster"
            if kind == "node_state" and scheduler_state(self.actuators, run.node) != guard["is"]:
                return f"{run.node} is {scheduler_state(self.actuators, run.node)}, not {guard['is']}"
            if kind == "blast_radius":
                with self.state.transaction() as db:
                    refusal = self._blast_radius(db, run)
                if refusal:
                    return refusal
        return None

    def _unavailable(self, db, run: RunRow) -> set[str]:
        # A backend that knows the cluster-wide out-of-service set (Slurm) answers from the
        # scheduler's truth in one call, so runbook engines and failover controllers on other
        # hosts count the same nodes.
        wide = getattr(self.actuators.scheduler, "out_of_service", None)
        if wide is not None:
            out = set(wide()) & set(self.nodes)
        else:
            out = {n for n in self.nodes if scheduler_state(self.actuators, n) == "quarantined"}
        return out | set(self.state.running_quarantines(db, run.id))

    def _blast_radius(self, db, run: RunRow) -> str | None:
        out = self._unavailable(db, run)
        if run.node in out:
            return None  # already out of service: quarantining again changes nothing
        limit = self.policy.max_unavailable_nodes(len(self.nodes))
        if len(out) + 1 > limit:
            return (f"blast radius: {len(out)} node(s) already out of service ({', '.join(sorted(out)) or '-'}), "
                    f"max_unavailable is {limit}")
        return None

    def _step_def(self, rb: Runbook, row: StepRow) -> Step:
        if row.phase == "main":
            return rb.steps[row.idx]
        return next(s for s in rb.on_failure if s.id == row.step_id)

    def _gate(self, rb: Runbook, step: Step, rows: list[StepRow], upto: int) -> str | None:
        """None when a destructive step may run; else why not."""
        if not step.destructive or step.kind in self.policy.runbook_auto_approve:
            return None
        # Only a person's approval counts here: policy approves an `approve` step only when
        # every step it guards is allowed anyway, so its approval must not carry further
        # (to an on_failure step, say).
        if any(r.kind == "approve" and r.status == "done" and r.idx < upto
               and (r.result or {}).get("approved_by") != "policy" for r in rows):
            return None
        return (f"{step.kind} step {step.id!r} is destructive and needs an approved `approve` step before it "
                f"(or policy.runbook_auto_approve listing {step.kind!r})")

    def _approve_is_automatic(self, rb: Runbook, row: StepRow) -> bool:
        # An approve step whose guarded steps (up to the next approve) are all allowed by
        # policy asks nobody: policy already made that decision.
        guarded = []
        for step in rb.steps[row.idx + 1:]:
            if step.kind == "approve":
                break
            guarded.append(step)
        return all(not s.destructive or s.kind in self.policy.runbook_auto_approve for s in guarded)

    def _run_step(self, run: RunRow, rb: Runbook, row: StepRow, variables: dict) -> str:
        step = self._step_def(rb, row)
        params = step_params(step, variables)
        resumed = row.status == "running"
        base = {"run_id": run.id, "runbook": rb.name, "step": step.id, "kind": step.kind, "phase": row.phase,
                "trigger": run.trigger, "inputs": params, "attempt": row.attempts + 1}
        if step.kind == "approve":
            return self._approve(run, rb, row, step, base)
        refusal = self._gate(rb, step, self.state.steps(run.id), row.idx if row.phase == "main" else 10**9)
        if refusal:
            return self._fail_step(run, rb, row, {"error": refusal}, 0.0, base)
        if resumed:
            reconciled = self._reconcile(run, row, step)
            if reconciled is not None:
                status, result = reconciled
                self.state.finish_step(run.id, row.idx, status, result)
                self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: {status} (after restart)",
                            run.node, {**base, "status": status, "result": result, "duration_s": 0.0})
                if status == "failed":
                    self._enter_failure(run, rb, row, result)
                return status
        if step.destructive and self.policy.dry_run:
            # Intake plans instead of running under dry-run; this catches runs accepted before
            # dry-run was switched on and resumed after it (a restart, an approval).
            return self._fail_step(run, rb, row, {"error": "policy.dry_run is on: destructive step not executed",
                                                  "refused": "dry_run"}, 0.0, base)
        if step.kind == "quarantine":
            with self.state.transaction() as db:
                refusal = self._blast_radius(db, run)
                if not refusal:
                    db.execute("UPDATE steps SET status='running', attempts=attempts+1, "
                               "started_at=COALESCE(started_at, ?) WHERE run_id=? AND idx=?",
                               (time.time(), run.id, row.idx))
                    db.execute("UPDATE runs SET status='running', updated_at=? WHERE id=?", (time.time(), run.id))
            if refusal:
                return self._fail_step(run, rb, row, {"error": refusal, "refused": "blast_radius"}, 0.0, base)
        else:
            self.state.mark_step_running(run.id, row.idx)
        self._audit("runbook.step.started", f"{rb.name}/{step.id} on {run.node}", run.node, base)
        started = self.state.steps(run.id)[row.idx].started_at or time.time()
        ctx = StepContext(run.id, rb, run.node, step, params, started, self.actuators, self.stop)
        t0 = time.monotonic()
        try:
            ok, result = ACTIONS[step.kind](ctx)
        except Interrupted:
            raise
        except AidcError as exc:
            ok, result = False, {"error": str(exc)}
        except Exception as exc:  # an actuator bug must fail the step, not kill the executor
            ok, result = False, {"error": f"{type(exc).__name__}: {exc}"}
        duration = time.monotonic() - t0
        if not ok:
            result.setdefault("error", f"{step.kind} step did not succeed")
            return self._fail_step(run, rb, row, result, duration, base)
        self.state.finish_step(run.id, row.idx, "done", result)
        self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: done", run.node,
                    {**base, "status": "done", "result": result, "duration_s": round(duration, 3)})
        return "done"

    def _reconcile(self, run: RunRow, row: StepRow, step: Step) -> tuple[str, dict] | None:
        """A step found `running` after a restart. None: run it (again) normally."""
        now = scheduler_state(self.actuators, run.node)
        if step.kind == "quarantine" and now == "quarantined":
            return "done", {"reconciled": True, "after": now, "detail": "quarantine had taken effect before the restart"}
        if step.kind == "release" and now == "in_service":
            return "done", {"reconciled": True, "after": now, "detail": "release had taken effect before the restart"}
        if step.kind in ("playbook", "burnin"):
            return "failed", {"reconciled": True, "error": f"{step.kind} step was interrupted by a restart; "
                              "its outcome is unknown and it is not repeated automatically"}
        return None

    def _approve(self, run: RunRow, rb: Runbook, row: StepRow, step: Step, base: dict) -> str:
        if row.status == "pending":
            self.state.mark_step_running(run.id, row.idx)
            row = self.state.steps(run.id)[row.idx]
            if row.phase == "main" and self._approve_is_automatic(rb, row):
                result = {"approved_by": "policy", "detail": "every step it guards is allowed by policy"}
                self.state.finish_step(run.id, row.idx, "done", result)
                self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: approved by policy", run.node,
                            {**base, "status": "done", "result": result, "duration_s": 0.0})
                return "done"
            self._audit("runbook.step.started", f"{rb.name}/{step.id} on {run.node}: waiting for approval",
                        run.node, base)
        by = self.state.approval(run.id, row.idx)
        waited = time.time() - (row.started_at or time.time())
        if by:
            result = {"approved_by": by, "waited_s": round(waited, 3)}
            self.state.finish_step(run.id, row.idx, "done", result)
            self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: approved by {by}", run.node,
                        {**base, "status": "done", "result": result, "duration_s": round(waited, 3)})
            return "done"
        if waited > step.timeout_s:
            return self._fail_step(run, rb, row, {"error": f"not approved within {step.timeout_s:g} s"}, waited, base)
        return "waiting"

    def _fail_step(self, run: RunRow, rb: Runbook, row: StepRow, result: dict, duration: float,
                   base: dict | None = None) -> str:
        self.state.finish_step(run.id, row.idx, "failed", result)
        self._audit("runbook.step", f"{rb.name}/{row.step_id} on {run.node}: failed: {result.get('error')}",
                    run.node, {**(base or {"run_id": run.id, "runbook": rb.name, "step": row.step_id,
                                           "kind": row.kind, "phase": row.phase, "trigger": run.trigger}),
                               "status": "failed", "result": result, "duration_s": round(duration, 3)})
        self._enter_failure(run, rb, row, result)
        return "failed"

    def _enter_failure(self, run: RunRow, rb: Runbook, row: StepRow, result: dict) -> None:
        refused_by_guard = result.get("refused") == "guard"
        if row.phase == "main" and (refused_by_guard or self._step_def(rb, row).on_failure == "abort"):
            self.state.append_failure_steps(run.id, [(s.id, s.kind) for s in rb.on_failure])

    def approve(self, run_id: int, by: str) -> StepRow:
        """Record a human's approval of the run's waiting `approve` step."""
        run = self.state.get_run(run_id)
        if run.status != "awaiting_approval":
            raise AidcError(f"run {run_id} is {run.status}, not awaiting approval")
        row = next((r for r in self.state.steps(run_id) if r.kind == "approve" and r.status == "running"), None)
        if row is None:
            raise AidcError(f"run {run_id} has no approve step waiting")
        self.state.approve(run_id, row.idx, by)
        self._audit("runbook.approval", f"run {run_id} step {row.step_id} approved by {by}", run.node,
                    {"run_id": run_id, "runbook": run.runbook, "step": row.step_id, "approved_by": by})
        return row

    # --- dry run ------------------------------------------------------------------------
    def plan(self, runbook: str, node: str, trigger: dict | None = None) -> list[PlannedStep]:
        """What a run would do, step by step. Changes nothing; the plan itself is audited."""
        rb = self.catalog.get(runbook)
        trigger = trigger or {"source": "cli"}
        variables = {**trigger.get("labels", {}), "node": node, "runbook": rb.name, "run_id": "(dry-run)"}
        out = []
        fake_run = RunRow(-1, rb.name, node, "pending", trigger, None, None, time.time(), time.time(), None)
        with self.state.transaction() as db:
            blast = self._blast_radius(db, fake_run)
        approved_before = False
        for phase, steps in (("main", rb.steps), ("on_failure", rb.on_failure)):
            for i, step in enumerate(steps):
                params = step_params(step, variables)
                gate = ""
                if step.kind == "approve":
                    auto = self._approve_is_automatic(rb, StepRow(-1, i, step.id, "approve", phase, "pending",
                                                                  0, None, None, None))
                    gate = "policy approves the steps it guards: no human needed" if auto else "needs a human"
                    approved_before = True
                elif step.destructive:
                    if step.kind in self.policy.runbook_auto_approve:
                        gate = "allowed by policy.runbook_auto_approve"
                    elif approved_before:
                        gate = "runs after the approval above"
                    else:
                        gate = "REFUSED: destructive and no approval before it"
                if step.kind == "quarantine":
                    gate += f"; {blast}" if blast else "; within max_unavailable"
                out.append(PlannedStep(len(out), step.id, step.kind, phase, step.destructive,
                                       describe(step, params, node, self.actuators), gate))
        for p in out:
            self._audit("runbook.dry_run.step", f"{rb.name}/{p.id} on {node}: would {p.would}", node,
                        {"runbook": rb.name, "dry_run": True, "trigger": trigger, **p.to_dict()})
        return out


def _next_row(rows: list[StepRow], rb: Runbook) -> tuple[StepRow | None, bool]:
    """The next step to run and whether the run has failed (main steps after a failure are skipped)."""
    failed = False
    for row in rows:
        if row.status == "done":
            continue
        if row.status == "failed":
            guard_refused = (row.result or {}).get("refused") == "guard"
            if row.phase == "main" and rb.steps[row.idx].on_failure == "continue" and not guard_refused:
                continue
            failed = True
            continue
        if failed and row.phase == "main":
            continue
        return row, failed
    return None, failed


def _definition_changed(rb: Runbook, rows: list[StepRow]) -> str | None:
    """Why the recorded steps of a run no longer match its runbook's definition, or None."""
    recorded = [(r.step_id, r.kind) for r in rows if r.phase == "main"]
    defined = [(s.id, s.kind) for s in rb.steps]
    if recorded != defined:
        return f"steps {recorded} now read {defined}"
    recovery = {(s.id, s.kind) for s in rb.on_failure}
    gone = [r.step_id for r in rows if r.phase == "on_failure" and (r.step_id, r.kind) not in recovery]
    if gone:
        return f"on_failure steps {gone} are no longer defined"
    return None


def _label_fingerprint(labels: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
