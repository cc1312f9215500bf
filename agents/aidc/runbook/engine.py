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
5. Every audit record is appended *before* the state change it describes (a run created, a
   step started or finished, a run finished): a kill in between repeats a record after the
   restart, never loses one. A step found `running` whose outcome is already in the audit
   log takes that outcome instead of running again; a step or run found finished without
   its record (state written by older code) gets one marked `recovered`.
6. With a remediation gate (aidc.failover.remediation, the one failover uses), a quarantine
   also passes the circuit breaker and counts towards it, and on a node remediated
   policy.escalation.node_remediations times in its window no destructive step runs without a
   person's approval, whatever policy.runbook_auto_approve says.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from aidc.audit.log import AuditLog, default_actor
from aidc.identity import authorize
from aidc.nodenames import RefusalLog, shown
from aidc.errors import AidcError
from aidc.runbook.actuators import Actuators
from aidc.runbook.catalog import Catalog, Runbook, RunbookError, Step
from aidc.runbook import params as run_params
from aidc.runbook import state as run_state
from aidc.runbook.state import ACTIVE, RunRow, RunState, StepRow, owner_alive
from aidc.runbook.steps import ACTIONS, Interrupted, StepContext, describe, scheduler_state, step_params
from aidc.spec import Policy


# alerts_seen key prefix for alerts planned under policy.dry_run (see Engine._plan_alert).
DRY_RUN_SEEN = "dry-run:"


@dataclass(frozen=True)
class Submission:
    outcome: str  # started | dry_run | rejected | duplicate | cooldown | node_busy | unmatched | no_node | unknown_node | resolved
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
    refused: str = ""  # why a real run would refuse this step ("" = it would run)

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
    access_roles: dict[str, str] = field(default_factory=dict)  # spec access.roles; empty: not enforced
    remediation: object | None = None  # aidc.failover.remediation.RemediationGate shared with failover
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # AuditLog keeps one connection; executor threads take turns on it.
        self._audit_lock = threading.Lock()
        # Alerts naming no node of this cluster: audited, a flood as one summary per window.
        self.refusals = RefusalLog(self.audit, self.actor, lock=self._audit_lock)

    def _unknown_node(self, rb: Runbook, node: str, source: str) -> Submission:
        reason = f"{shown(node)} is not a node of this cluster"
        self.refusals.refuse(node, "runbook", source, f"{rb.name}: {reason}")
        return Submission("unknown_node", reason, rb.name, node)

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
        if alert.get("annotations"):
            trigger["annotations"] = alert["annotations"]
        if sender:
            trigger["sender"] = sender
        if node not in self.nodes:
            who = sender or {}
            return self._unknown_node(rb, node, str(who.get("identity") or who.get("address") or "alertmanager"))
        if self.policy.dry_run:
            return self._plan_alert(rb, node, trigger, fingerprint, str(alert.get("startsAt", "")))
        return self.submit(rb.name, node, trigger, fingerprint, str(alert.get("startsAt", "")))

    def _plan_alert(self, rb: Runbook, node: str, trigger: dict, fingerprint: str, starts_at: str) -> Submission:
        """Under policy.dry_run: plan (and audit) the run an alert would start, once per alert,
        deduplicated by fingerprint and start like a live one. Sightings are kept apart from live
        ones, so an alert planned under dry-run still starts a run once dry-run is off."""
        with self.state.transaction() as db:
            if self.state.alert_seen(db, DRY_RUN_SEEN + fingerprint, starts_at) is not False:
                return Submission("duplicate", "alert already planned under policy.dry_run "
                                  "(same fingerprint and start)", rb.name, node)
            self.state.record_alert(db, DRY_RUN_SEEN + fingerprint, starts_at, None)
        try:
            self.plan(rb.name, node, trigger)
        except run_params.ParamError as exc:
            # This alert's answer, not the notification's: the others in it are still planned.
            # Marked seen above, so Alertmanager's repeats are duplicates, as a live run's are.
            reason = f"trigger values do not fit the runbook's params: {exc}"
            self._audit("runbook.params.rejected", f"{rb.name} on {node}: {exc}", node,
                        {"runbook": rb.name, "dry_run": True, "trigger": trigger, "error": str(exc)})
            return Submission("rejected", reason, rb.name, node)
        except Exception:
            # Not this alert's fault (a scheduler or database hiccup): unmark it, so that
            # Alertmanager's retry plans it instead of calling it a duplicate.
            with self.state.transaction() as db:
                self.state.forget_alert(db, DRY_RUN_SEEN + fingerprint, starts_at)
            raise
        return Submission("dry_run", "policy.dry_run: planned and audited, nothing changed", rb.name, node)

    def submit(self, runbook: str, node: str, trigger: dict, fingerprint: str | None = None,
               starts_at: str = "") -> Submission:
        rb = self.catalog.get(runbook)
        if node not in self.nodes:
            return self._unknown_node(rb, node, str(trigger.get("user") or trigger.get("source") or "-"))
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
            # Audited before the run commits: a kill in between leaves a record of a run that
            # never started (its alert is not marked seen, so Alertmanager's repeat starts it),
            # never a run without its record.
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
        self.recover_audit([run_id])
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
        try:
            # Only declared, typed values reach a step (runbooks/schema.json `params`).
            values = run_params.validate(rb.params, run.trigger.get("labels") or {},
                                         run.trigger.get("annotations") or {}, nodes=self.nodes)
        except run_params.ParamError as exc:
            self._audit("runbook.params.rejected", f"{rb.name} on {run.node}: {exc}", run.node,
                        {"run_id": run_id, "runbook": rb.name, "trigger": run.trigger, "error": str(exc),
                         "problems": [{"name": p.name, "kind": p.kind} for p in exc.problems]})
            self._abandon(run, f"trigger values do not fit the runbook's params: {exc}")
            return
        variables = {**values, "node": run.node, "runbook": rb.name, "run_id": run_id}
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
        self._finish_run(run, status, error)

    def _abandon(self, run: RunRow, error: str) -> None:
        self._finish_run(run, "failed", error)

    def _finish_run(self, run: RunRow, status: str, error: str | None) -> None:
        # A kill after the record and before the state change leaves the run active: the
        # restarted engine comes here again and finds the record already written.
        if not self.audit.find("runbook.run.finished", run_id=run.id):
            self._audit("runbook.run.finished", f"{run.runbook} on {run.node}: {status}", run.node,
                        {"run_id": run.id, "runbook": run.runbook, "status": status, "error": error,
                         "duration_s": round(time.time() - run.created_at, 3)})
        self.state.set_run_status(run.id, status, error)

    def recover_audit(self, run_ids: list[int] | None = None) -> int:
        """Write a `recovered` record for each run start, finished step and finished run that
        the state holds and the audit log lacks. Returns how many were written.

        Records come before state changes, so this finds nothing in state this engine wrote;
        it repairs state written by older code (which recorded after the state change)."""
        runs = [self.state.get_run(i) for i in run_ids] if run_ids is not None else self.state.runs()
        written = 0
        for run in runs:
            base = {"run_id": run.id, "runbook": run.runbook, "recovered": True}
            if not self.audit.find("runbook.run.started", run_id=run.id):
                self._audit("runbook.run.started", f"{run.runbook} on {run.node} (recovered after restart)",
                            run.node, {**base, "trigger": run.trigger})
                written += 1
            for row in self.state.steps(run.id):
                if row.status in ("done", "failed") and not self.audit.find(
                        "runbook.step", run_id=run.id, idx=row.idx, status=row.status):
                    self._audit("runbook.step", f"{run.runbook}/{row.step_id} on {run.node}: {row.status} "
                                "(recovered after restart)", run.node,
                                {**base, "step": row.step_id, "idx": row.idx, "kind": row.kind, "phase": row.phase,
                                 "attempt": row.attempts, "status": row.status, "result": row.result})
                    written += 1
            if run.status in ("done", "failed") and not self.audit.find("runbook.run.finished", run_id=run.id):
                self._audit("runbook.run.finished", f"{run.runbook} on {run.node}: {run.status} "
                            "(recovered after restart)", run.node,
                            {**base, "status": run.status, "error": run.error})
                written += 1
        return written

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
        try:
            out = self._unavailable(db, run)
        except AidcError as exc:  # fail closed: no count, no quarantine
            return f"blast radius unknown: cannot read the out-of-service nodes from the scheduler ({exc})"
        if run.node in out:
            return None  # already out of service: quarantining again changes nothing
        limit = self.policy.max_unavailable_nodes(len(self.nodes))
        if len(out) + 1 > limit:
            return (f"blast radius: {len(out)} node(s) already out of service ({', '.join(sorted(out)) or '-'}), "
                    f"max_unavailable is {limit}")
        return None

    def _breaker(self, db, run: RunRow) -> str | None:
        """The circuit breaker failover obeys (None without a gate, or for a node already out)."""
        if self.remediation is None:
            return None
        try:
            if run.node in self._unavailable(db, run):
                return None
        except AidcError:
            return None  # _blast_radius has refused already
        return self.remediation.admit(run.node, ref=f"run {run.id}")

    def _offender(self, step: Step, node: str | None) -> str | None:
        """A release step does not return a repeat offender (aidc.failover.offenders), whatever
        its burn-in said: the failover store's mark decides, cleared only by an approver."""
        if step.kind != "release" or self.remediation is None or node is None:
            return None
        from aidc.failover.offenders import refusal

        return refusal(self.remediation.store, node)

    def _step_def(self, rb: Runbook, row: StepRow) -> Step:
        if row.phase == "main":
            return rb.steps[row.idx]
        return next(s for s in rb.on_failure if s.id == row.step_id)

    def _needs_person(self, node: str | None) -> str | None:
        if self.remediation is None or node is None:
            return None
        return self.remediation.needs_person(node)

    def _gate(self, rb: Runbook, step: Step, rows: list[StepRow], upto: int, node: str | None = None) -> str | None:
        """None when a destructive step may run; else why not."""
        if not step.destructive:
            return None
        person = self._needs_person(node) if step.kind in self.policy.runbook_auto_approve else None
        if step.kind in self.policy.runbook_auto_approve and not person:
            return None
        # Only a person's approval counts here: policy approves an `approve` step only when
        # every step it guards is allowed anyway, so its approval must not carry further
        # (to an on_failure step, say).
        if any(r.kind == "approve" and r.status == "done" and r.idx < upto
               and (r.result or {}).get("approved_by") != "policy" for r in rows):
            return None
        if person:
            return f"{step.kind} step {step.id!r} needs an approved `approve` step before it: {person}"
        return (f"{step.kind} step {step.id!r} is destructive and needs an approved `approve` step before it "
                f"(or policy.runbook_auto_approve listing {step.kind!r})")

    def _approve_is_automatic(self, rb: Runbook, row: StepRow, node: str | None = None) -> bool:
        # An approve step whose guarded steps (up to the next approve) are all allowed by
        # policy asks nobody: policy already made that decision.
        guarded = []
        for step in rb.steps[row.idx + 1:]:
            if step.kind == "approve":
                break
            guarded.append(step)
        if any(s.destructive for s in guarded) and self._needs_person(node):
            return False
        return all(not s.destructive or s.kind in self.policy.runbook_auto_approve for s in guarded)

    def _run_step(self, run: RunRow, rb: Runbook, row: StepRow, variables: dict) -> str:
        step = self._step_def(rb, row)
        params = step_params(step, variables)
        resumed = row.status == "running"
        base = {"run_id": run.id, "runbook": rb.name, "step": step.id, "idx": row.idx, "kind": step.kind,
                "phase": row.phase, "trigger": run.trigger, "inputs": params, "attempt": row.attempts + 1}
        if resumed:
            recorded = self._recorded_outcome(run, row)
            if recorded is not None:
                # Killed after auditing the outcome and before recording it here: take the
                # audited outcome; the action is not repeated and nothing is audited twice.
                status, result = recorded
                self.state.finish_step(run.id, row.idx, status, result)
                if status == "failed":
                    self._enter_failure(run, rb, row, result)
                return status
        if step.kind == "approve":
            return self._approve(run, rb, row, step, base)
        refusal = self._gate(rb, step, self.state.steps(run.id), row.idx if row.phase == "main" else 10**9, run.node)
        if refusal:
            return self._fail_step(run, rb, row, {"error": refusal}, 0.0, base)
        offender = self._offender(step, run.node)
        if offender:
            return self._fail_step(run, rb, row, {"error": offender, "refused": "repeat_offender"}, 0.0, base)
        if resumed:
            reconciled = self._reconcile(run, row, step)
            if reconciled is not None:
                status, result = reconciled
                # The outcome of the attempt in flight at the restart (not a new attempt).
                self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: {status} (after restart)",
                            run.node, {**base, "attempt": row.attempts, "status": status, "result": result,
                                       "duration_s": 0.0})
                self.state.finish_step(run.id, row.idx, status, result)
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
                refusal = self._blast_radius(db, run) or self._breaker(db, run)
                if not refusal:
                    self.state.start_step(db, run.id, row.idx)
                    self._audit("runbook.step.started", f"{rb.name}/{step.id} on {run.node}", run.node, base)
            if refusal:
                cause = "breaker_open" if "circuit breaker" in refusal else "blast_radius"
                return self._fail_step(run, rb, row, {"error": refusal, "refused": cause}, 0.0, base)
        else:
            self._audit("runbook.step.started", f"{rb.name}/{step.id} on {run.node}", run.node, base)
            self.state.mark_step_running(run.id, row.idx)
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
        self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: done", run.node,
                    {**base, "status": "done", "result": result, "duration_s": round(duration, 3)})
        if step.kind == "quarantine" and self.remediation is not None:
            # Counted once per step (a resumed step records the same ref), as failover counts its own.
            with self.remediation.store.transaction():
                self.remediation.record(run.node, "quarantine", "runbook", f"run {run.id} step {row.idx}")
        self.state.finish_step(run.id, row.idx, "done", result)
        return "done"

    def _recorded_outcome(self, run: RunRow, row: StepRow) -> tuple[str, dict] | None:
        """The audited outcome of the attempt a restart interrupted, if it was audited."""
        for rec in reversed(self.audit.find("runbook.step", run_id=run.id, idx=row.idx, attempt=row.attempts)):
            if rec.payload.get("status") in ("done", "failed"):
                return rec.payload["status"], rec.payload.get("result") or {}
        return None

    def _reconcile(self, run: RunRow, row: StepRow, step: Step) -> tuple[str, dict] | None:
        """A step found `running` after a restart. None: run it (again) normally."""
        now = scheduler_state(self.actuators, run.node)
        if step.kind == "quarantine" and now == "quarantined":
            return "done", {"reconciled": True, "after": now, "detail": "quarantine had taken effect before the restart"}
        if step.kind == "release" and now == "in_service":
            return "done", {"reconciled": True, "after": now, "detail": "release had taken effect before the restart"}
        if step.kind in ("playbook", "burnin"):
            result = {"reconciled": True, "error": f"{step.kind} step was interrupted by a restart; "
                      "its outcome is unknown and it is not repeated automatically"}
            recover = getattr(self.actuators.burnin, "recover", None) if step.kind == "burnin" else None
            if recover is not None:  # what the burn-in opened to reach the node (a reservation) is closed
                try:
                    result["recovered"] = recover(run.node)
                except AidcError as exc:
                    result["recover_error"] = str(exc)
            return "failed", result
        return None

    def _approve(self, run: RunRow, rb: Runbook, row: StepRow, step: Step, base: dict) -> str:
        if row.status == "pending":
            if row.phase == "main" and self._approve_is_automatic(rb, row, run.node):
                result = {"approved_by": "policy", "detail": "every step it guards is allowed by policy"}
                self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: approved by policy", run.node,
                            {**base, "status": "done", "result": result, "duration_s": 0.0})
                self.state.mark_step_running(run.id, row.idx)
                self.state.finish_step(run.id, row.idx, "done", result)
                return "done"
            self._audit("runbook.step.started", f"{rb.name}/{step.id} on {run.node}: waiting for approval",
                        run.node, base)
            self.state.mark_step_running(run.id, row.idx)
            row = self.state.steps(run.id)[row.idx]
        by = self.state.approval(run.id, row.idx)
        waited = time.time() - (row.started_at or time.time())
        if by:
            result = {"approved_by": by, "waited_s": round(waited, 3)}
            self._audit("runbook.step", f"{rb.name}/{step.id} on {run.node}: approved by {by}", run.node,
                        {**base, "attempt": row.attempts, "status": "done", "result": result,
                         "duration_s": round(waited, 3)})
            self.state.finish_step(run.id, row.idx, "done", result)
            return "done"
        if waited > step.timeout_s:
            return self._fail_step(run, rb, row, {"error": f"not approved within {step.timeout_s:g} s"}, waited, base)
        return "waiting"

    def _fail_step(self, run: RunRow, rb: Runbook, row: StepRow, result: dict, duration: float,
                   base: dict | None = None) -> str:
        self._audit("runbook.step", f"{rb.name}/{row.step_id} on {run.node}: failed: {result.get('error')}",
                    run.node, {**(base or {"run_id": run.id, "runbook": rb.name, "step": row.step_id, "idx": row.idx,
                                           "kind": row.kind, "phase": row.phase, "trigger": run.trigger}),
                               "status": "failed", "result": result, "duration_s": round(duration, 3)})
        self.state.finish_step(run.id, row.idx, "failed", result)
        self._enter_failure(run, rb, row, result)
        return "failed"

    def _enter_failure(self, run: RunRow, rb: Runbook, row: StepRow, result: dict) -> None:
        refused_by_guard = result.get("refused") == "guard"
        if row.phase == "main" and (refused_by_guard or self._step_def(rb, row).on_failure == "abort"):
            self.state.append_failure_steps(run.id, [(s.id, s.kind) for s in rb.on_failure])

    def approve(self, run_id: int, identity: str, note: str | None = None) -> StepRow:
        """Record an approval of the run's waiting `approve` step by an authenticated identity
        (aidc.identity; `note`: a self-asserted name, kept beside it). With access roles
        configured it needs role approver: a step waits for a person only when it guards a
        destructive step policy does not allow (others policy approves). A refusal is audited
        and raised (PolicyRefusal)."""
        run = self.state.get_run(run_id)
        if run.status != "awaiting_approval":
            raise AidcError(f"run {run_id} is {run.status}, not awaiting approval")
        rows = self.state.steps(run_id)
        row = next((r for r in rows if r.kind == "approve" and r.status == "running"), None)
        if row is None:
            raise AidcError(f"run {run_id} has no approve step waiting")
        rb = self.catalog.get(run.runbook)
        guarded = self._guarded_by(rb, rows, row)
        destructive = [s.id for s in guarded if s.destructive]
        about = {"run_id": run_id, "runbook": run.runbook, "step": row.step_id, "idx": row.idx,
                 **({"note": note} if note else {})}
        with self._audit_lock:
            authorize(self.access_roles, [identity], "approver",
                      f"approve step {row.step_id} of run {run_id}"
                      + (f" (it guards destructive steps {', '.join(destructive)})" if destructive else ""),
                      self.audit, run.node, {**about, "destructive_steps": destructive})
            self.audit.append("runbook.approval", f"run {run_id} step {row.step_id} approved by {identity}"
                              + (f" ({note})" if note else ""), actor=identity, node=run.node,
                              payload={**about, "approved_by": identity})
        self.state.approve(run_id, row.idx, identity)
        return row

    def _guarded_by(self, rb: Runbook, rows: list[StepRow], row: StepRow) -> list[Step]:
        """The steps an approve step guards: those after it in its phase, up to the next approve."""
        guarded = []
        for later in rows[row.idx + 1:]:
            if later.phase != row.phase:
                continue
            if later.kind == "approve":
                break
            guarded.append(self._step_def(rb, later))
        return guarded

    # --- dry run ------------------------------------------------------------------------
    def plan(self, runbook: str, node: str, trigger: dict | None = None) -> list[PlannedStep]:
        """What a run would do, step by step. Changes nothing; the plan itself is audited."""
        rb = self.catalog.get(runbook)
        trigger = trigger or {"source": "cli"}
        # A value given must fit (ParamError otherwise); one not given shows as <name?>.
        values = run_params.validate(rb.params, trigger.get("labels") or {}, trigger.get("annotations") or {},
                                     nodes=self.nodes, allow_missing=True)
        variables = {**values, "node": node, "runbook": rb.name, "run_id": "(dry-run)"}
        out = []
        fake_run = RunRow(-1, rb.name, node, "pending", trigger, None, None, time.time(), time.time(), None)
        with self.state.transaction() as db:
            blast = self._blast_radius(db, fake_run)
        approved_before = False
        for phase, steps in (("main", rb.steps), ("on_failure", rb.on_failure)):
            for i, step in enumerate(steps):
                params = step_params(step, variables)
                gate, refused = "", ""
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
                        refused = "destructive and no approval before it"
                if step.kind == "quarantine":
                    if blast:
                        refused = f"{refused}; {blast}" if refused else blast
                    else:
                        gate += "; within max_unavailable" if gate else "within max_unavailable"
                out.append(PlannedStep(len(out), step.id, step.kind, phase, step.destructive,
                                       describe(step, params, node, self.actuators), gate, refused))
        for p in out:
            # A refusal is said as one, first: "would <act>" alone reads as permission.
            said = f"WOULD BE REFUSED: {p.refused} (it would {p.would})" if p.refused else f"would {p.would}"
            self._audit("runbook.dry_run.step", f"{rb.name}/{p.id} on {node}: {said}", node,
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
