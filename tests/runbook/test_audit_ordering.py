"""A kill -9 of the runbook engine never loses an audit record (issue #13, class 7).

The kill is simulated deterministically: every durable write the engine makes (a state
transaction committed, a finished step recorded, an audit record appended) is numbered,
and for each number N the engine is "killed" (SystemExit) right after write N, then a new
engine on the same files takes over, as `aidc runbook serve` does after a restart."""

from __future__ import annotations

import contextlib
import json
import sqlite3

from aidc.audit.log import AuditLog
from aidc.runbook.actuators import Actuators
from aidc.runbook.catalog import Catalog
from aidc.runbook.engine import Engine
from aidc.runbook.state import ACTIVE, RunState
from aidc.spec import Policy
from runbook_fakes import NODES, FakeBurnin, FakeMetrics, FakeNotifier, FakePlaybooks, FakeScheduler, alert, write_runbook

OUT_AND_BACK = """
name: out-and-back
title: Out and back
summary: Quarantine, tell on-call, release (policy approves both destructive steps).
trigger: {alerts: [{alertname: OutAndBack}]}
steps:
  - {id: ok, kind: approve, prompt: "take ${node} out?"}
  - {id: out, kind: quarantine, reason: "drill"}
  - {id: tell, kind: notify, message: "${node} is out"}
  - {id: back, kind: release, reason: "drill over"}
"""

POLICY = Policy(max_unavailable=2, runbook_auto_approve=["quarantine", "release"])


class Killed(SystemExit):
    """The engine process dies here (kill -9): nothing after this point runs."""


class KillAfterWrite:
    """Counts the engine's durable writes and kills it right after write number `at`."""

    def __init__(self, at: int):
        self.at, self.count, self.fired, self.what = at, 0, False, ""
        self.last_record = None  # the audit record appended last before the kill

    def wrote(self, what: str) -> None:
        self.count += 1
        if self.count == self.at and not self.fired:
            self.fired, self.what = True, what
            raise Killed(f"killed after write {self.at}: {what}")

    def arm(self, engine: Engine) -> None:
        state, audit = engine.state, engine.audit
        transaction, finish_step, append = state.transaction, state.finish_step, audit.append

        @contextlib.contextmanager
        def committed_then_maybe_killed():
            with transaction() as db:
                yield db
            self.wrote("state transaction")

        def finish_step_then_maybe_killed(run_id, idx, status, result):
            finish_step(run_id, idx, status, result)
            self.wrote(f"state: step {idx} {status}")

        def append_then_maybe_killed(kind, reason, **kw):
            record = append(kind, reason, **kw)
            if not self.fired:
                self.last_record = record
            self.wrote(f"audit: {kind}")
            return record

        state.transaction = committed_then_maybe_killed
        state.finish_step = finish_step_then_maybe_killed
        audit.append = append_then_maybe_killed


def _engine(workdir, actuators) -> Engine:
    return Engine(catalog=Catalog.load(workdir / "runbooks"), state=RunState(workdir / "state.db"),
                  audit=AuditLog(workdir / "audit.db"), actuators=actuators, nodes=list(NODES), policy=POLICY)


def _close(engine: Engine) -> None:
    engine.audit.close()
    engine.state.close()


def _lost_records(workdir) -> list[str]:
    """State changes the audit log has no record of."""
    state, audit = RunState(workdir / "state.db"), AuditLog(workdir / "audit.db")
    try:
        lost = []
        for run in state.runs():
            if not audit.find("runbook.run.started", run_id=run.id):
                lost.append(f"run {run.id} started")
            if run.status in ("done", "failed") and not audit.find("runbook.run.finished", run_id=run.id):
                lost.append(f"run {run.id} finished {run.status}")
            for step in state.steps(run.id):
                if step.status in ("done", "failed") and not audit.find(
                        "runbook.step", run_id=run.id, idx=step.idx, status=step.status):
                    lost.append(f"run {run.id} step {step.step_id} {step.status}")
        return lost
    finally:
        state.close()
        audit.close()


def _crash_and_restart(workdir, kill_at: int) -> tuple[KillAfterWrite, FakeScheduler, FakeNotifier]:
    (workdir / "runbooks").mkdir(parents=True)
    write_runbook(workdir / "runbooks", OUT_AND_BACK)
    scheduler, notifier = FakeScheduler(), FakeNotifier()
    actuators = Actuators(scheduler=scheduler, metrics=FakeMetrics(), playbooks=FakePlaybooks(),
                          burnin=FakeBurnin(), notifier=notifier)
    firing = alert("OutAndBack", "gpu-1", fingerprint="drill")
    kill = KillAfterWrite(kill_at)
    first = _engine(workdir, actuators)
    kill.arm(first)
    try:
        sub = first.submit_alert(firing)
        first.execute(sub.run_id)
    except Killed:
        pass
    finally:
        _close(first)
    restarted = _engine(workdir, actuators)
    try:
        restarted.submit_alert(firing)  # Alertmanager repeats the notification
        for run in restarted.state.runs(status=ACTIVE):
            restarted.execute(run.id)
    finally:
        _close(restarted)
    return kill, scheduler, notifier


def test_a_kill_after_any_durable_write_loses_no_audit_record_and_repeats_no_destructive_step(tmp_path):
    points = 0
    for kill_at in range(1, 80):  # bounded: a run of this runbook makes far fewer writes
        workdir = tmp_path / f"kill-{kill_at}"
        kill, scheduler, notifier = _crash_and_restart(workdir, kill_at)
        if not kill.fired:
            break
        points += 1
        where = f"killed after write {kill_at} ({kill.what})"
        state = RunState(workdir / "state.db")
        [run] = state.runs()
        assert run.status == "done", where
        state.close()
        assert _lost_records(workdir) == [], where
        assert scheduler.calls == [("quarantine", "gpu-1"), ("release", "gpu-1")], where
        with AuditLog(workdir / "audit.db") as audit:
            assert audit.verify().ok, where
            assert [r for r in audit.records() if r.payload.get("recovered")] == [], where
    assert points >= 15  # every write of the run was a kill point


def test_a_step_found_running_whose_outcome_was_audited_takes_that_outcome_and_is_not_repeated(tmp_path):
    # Killed after the notify step's "done" record and before its state change: the
    # restarted engine must not notify twice.
    kill_after_notify_record = None
    for kill_at in range(1, 80):
        workdir = tmp_path / f"kill-{kill_at}"
        kill, _, notifier = _crash_and_restart(workdir, kill_at)
        if kill.what == "audit: runbook.step" and kill.last_record.payload["step"] == "tell":
                kill_after_notify_record = kill_at
                assert [m for _, m in notifier.messages] == ["gpu-1 is out"]
                break
    assert kill_after_notify_record is not None


def _legacy_state_without_records(workdir, engine: Engine) -> int:
    """A run whose first step finished in state while its audit record was lost (older code)."""
    sub = engine.submit_alert(alert("OutAndBack", "gpu-1", fingerprint="legacy"))
    db = sqlite3.connect(workdir / "audit.db")
    db.execute("DELETE FROM audit")  # the records older code lost to the kill
    db.commit()
    db.close()
    engine.audit.anchor_path.unlink()
    engine.state.mark_step_running(sub.run_id, 0)
    engine.state.finish_step(sub.run_id, 0, "done", {"approved_by": "policy"})
    return sub.run_id


def test_a_step_found_done_without_its_record_gets_a_recovered_record_once(make_engine, tmp_path, fakes):
    engine = make_engine(OUT_AND_BACK, policy=POLICY)
    run_id = _legacy_state_without_records(tmp_path, engine)
    engine.execute(run_id)
    recovered = [r for r in engine.audit.records() if r.payload.get("recovered")]
    assert [(r.kind, r.payload.get("idx")) for r in recovered] == [("runbook.run.started", None),
                                                                    ("runbook.step", 0)]
    assert recovered[1].payload["status"] == "done" and "recovered after restart" in recovered[1].reason
    assert _lost_records(tmp_path) == []
    assert fakes.scheduler.calls == [("quarantine", "gpu-1"), ("release", "gpu-1")]
    assert engine.recover_audit() == 0  # a second restart adds nothing


def test_a_finished_run_without_its_record_gets_a_recovered_record_from_recover_audit(make_engine, tmp_path):
    engine = make_engine(OUT_AND_BACK, policy=POLICY)
    run = engine.execute(engine.submit_alert(alert("OutAndBack", "gpu-1", fingerprint="f")).run_id)
    assert run.status == "done"
    db = sqlite3.connect(tmp_path / "audit.db")
    db.execute("DELETE FROM audit WHERE kind = 'runbook.run.finished'")  # the last record: the chain still holds
    db.commit()
    db.close()
    engine.audit.anchor_path.write_text(json.dumps({"seq": 1, "hash": engine.audit.records()[0].hash}))
    assert engine.recover_audit() == 1
    [finished] = engine.audit.find("runbook.run.finished", run_id=run.id)
    assert finished.payload["recovered"] is True and finished.payload["status"] == "done"
    assert engine.audit.verify().ok
