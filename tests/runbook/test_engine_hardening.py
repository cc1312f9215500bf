"""Safety rules found by review: each was a way for a run to act when it should not, or to
hold a node's lock forever. Fake actuators; no clocks asserted."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

from aidc.runbook import state as run_state
from aidc.runbook.state import owner_alive, this_owner
from runbook_fakes import QUARANTINE_AND_NOTIFY, WITH_PLAYBOOK, alert

BROKEN_Q = 'broken{Hostname="gpu-1"}'

GUARDED_WITH_LENIENT_FIRST_STEP = """
name: guarded
title: Guarded
summary: Only for nodes in service; the first check may fail without stopping the run.
trigger: {alerts: [{alertname: Guarded}]}
guards: [{guard: node_state, is: in_service}]
steps:
  - {id: probe, kind: check, source: scheduler, expect: in_service, on_failure: continue}
  - {id: reset, kind: playbook, playbook: gpu-reset.yml}
on_failure:
  - {id: hand-over, kind: notify, message: "guarded refused on ${node}"}
"""

POLICY_APPROVED_THEN_FAILING = """
name: restart
title: Restart
summary: Restart the agent (policy allows playbooks); quarantine if that fails.
trigger: {alerts: [{alertname: Restart}]}
steps:
  - {id: ok, kind: approve, prompt: "restart?"}
  - {id: restart, kind: playbook, playbook: restart-agent.yml}
on_failure:
  - {id: take-out, kind: quarantine, reason: "restart failed"}
"""


def test_a_refused_guard_fails_the_run_even_when_the_first_step_may_fail(make_engine, fakes):
    from aidc.spec import Policy

    engine = make_engine(GUARDED_WITH_LENIENT_FIRST_STEP, policy=Policy(runbook_auto_approve=["playbook"]))
    fakes.scheduler.states["gpu-1"] = "quarantined"
    run = engine.execute(engine.submit_alert(alert("Guarded", "gpu-1")).run_id)
    assert run.status == "failed" and "guard refused" in run.error
    assert fakes.playbooks.calls == []
    assert [m for _, m in fakes.notifier.messages] == ["guarded refused on gpu-1"]  # on_failure still runs


def test_a_policy_approval_does_not_cover_a_destructive_on_failure_step(make_engine, fakes):
    from aidc.spec import Policy

    engine = make_engine(POLICY_APPROVED_THEN_FAILING, policy=Policy(runbook_auto_approve=["playbook"]))
    fakes.playbooks.ok = False
    run = engine.execute(engine.submit_alert(alert("Restart", "gpu-1")).run_id)
    assert run.status == "failed"
    assert fakes.scheduler.calls == []  # no person approved a quarantine and policy does not allow one
    take_out = next(s for s in engine.state.steps(run.id) if s.step_id == "take-out")
    assert take_out.status == "failed" and "needs an approved" in take_out.result["error"]


def test_runs_accepted_before_dry_run_was_switched_on_do_not_act_when_resumed(make_engine, fakes, tmp_path):
    from aidc.spec import Policy

    before = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    sub = before.submit_alert(alert("NodeBroken", "gpu-1"))  # accepted; the receiver then restarts
    after = make_engine(QUARANTINE_AND_NOTIFY, policy=Policy(dry_run=True))
    assert sub.run_id in after.runnable()
    run = after.execute(sub.run_id)
    assert run.status == "failed" and "policy.dry_run" in run.error
    assert fakes.scheduler.calls == []


def test_a_run_whose_runbook_is_gone_is_failed_and_frees_the_node(make_engine, fakes, tmp_path):
    engine = make_engine(WITH_PLAYBOOK)
    sub = engine.submit_alert(alert("NeedsFix", "gpu-1"))
    assert engine.execute(sub.run_id).status == "awaiting_approval"
    (tmp_path / "runbooks" / "fix-it.yaml").unlink()  # retired, then the receiver restarted
    restarted = make_engine(QUARANTINE_AND_NOTIFY)
    run = restarted.execute(sub.run_id)
    assert run.status == "failed" and "not resumed" in run.error
    assert restarted.execute(sub.run_id).status == "failed"  # settled: the scanner will not retry it
    fakes.metrics.values[BROKEN_Q] = [1.0]
    assert restarted.submit_alert(alert("NodeBroken", "gpu-1", fingerprint="new")).outcome == "started"
    assert [r.payload["status"] for r in restarted.audit.records(kind="runbook.run.finished")] == ["failed"]


def test_a_run_whose_steps_changed_is_not_mapped_onto_the_new_definition(make_engine, fakes, tmp_path):
    engine = make_engine(WITH_PLAYBOOK)
    sub = engine.submit_alert(alert("NeedsFix", "gpu-1"))
    engine.execute(sub.run_id)
    path = tmp_path / "runbooks" / "fix-it.yaml"
    path.write_text(path.read_text().replace("  - {id: ok-to-reset, kind: approve", "  - {id: wait, kind: wait, seconds: 1}\n"
                                             "  - {id: ok-to-reset, kind: approve"))
    engine.approve(sub.run_id, "carol")
    run = make_engine().execute(sub.run_id)
    assert run.status == "failed" and "changed since run" in run.error
    assert fakes.playbooks.calls == [] and fakes.scheduler.calls == [("quarantine", "gpu-1")]


def test_an_earlier_process_with_this_pid_is_not_taken_for_this_one():
    # A receiver running as a container's PID 1 comes back as PID 1 after a restart.
    host, pid, ticks = this_owner().split(":")
    assert owner_alive(this_owner())
    assert not owner_alive(f"{host}:{pid}:{int(ticks) + 1}")


def test_an_exited_process_is_dead_in_either_owner_format():
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not owner_alive(f"{socket.gethostname()}:{proc.pid}")
    assert not owner_alive(f"{socket.gethostname()}:{proc.pid}:12345")
    assert owner_alive(f"{socket.gethostname()}:{os.getppid()}")  # a live one, old format


def test_another_hosts_executor_is_alive_only_while_its_lease_is_fresh(make_engine, fakes, monkeypatch):
    import time

    assert owner_alive("elsewhere:1:1", time.time())
    assert not owner_alive("elsewhere:1:1", time.time() - run_state.LEASE_S - 1)
    assert not owner_alive("elsewhere:1:1", None)
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    sub = engine.submit_alert(alert("NodeBroken", "gpu-1"))
    engine.state.db.execute("UPDATE runs SET owner = 'gone-pod:1:1', status = 'running', updated_at = ? WHERE id = ?",
                            (time.time() - run_state.LEASE_S - 1, sub.run_id))
    assert sub.run_id in engine.runnable()
    assert engine.execute(sub.run_id).status == "done"


def test_the_executor_renews_its_lease_while_a_step_runs(make_engine, fakes, monkeypatch):
    monkeypatch.setattr(run_state, "LEASE_S", 0.15)  # renew every 0.05 s
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    sub = engine.submit_alert(alert("NodeBroken", "gpu-1"))
    renewed, pause = threading.Event(), threading.Event()

    def slow_quarantine(node, reason, event=None):
        # Nothing but the lease touches the run while its action runs: wait (bounded) for it to move.
        at_start = engine.state.get_run(sub.run_id).updated_at
        for _ in range(100):
            if engine.state.get_run(sub.run_id).updated_at > at_start:
                renewed.set()
                break
            pause.wait(0.05)
        fakes.scheduler.states[node] = "quarantined"

    monkeypatch.setattr(fakes.scheduler, "quarantine", slow_quarantine)
    assert engine.execute(sub.run_id).status == "done"
    assert renewed.is_set()


def test_a_quarantine_warning_from_the_backend_is_kept_in_the_audited_result(make_engine, fakes, monkeypatch):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values[BROKEN_Q] = [1.0]

    def quarantine_with_warning(node, reason, event=None):
        fakes.scheduler.states[node] = "quarantined"
        return "on_quarantine hook failed: ConnectionRefusedError()"

    monkeypatch.setattr(fakes.scheduler, "quarantine", quarantine_with_warning)
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    assert run.status == "done"
    out = next(r for r in engine.audit.records(kind="runbook.step") if r.payload["step"] == "out")
    assert out.payload["result"]["warning"].startswith("on_quarantine hook failed")
