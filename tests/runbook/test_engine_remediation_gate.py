"""The runbook engine and failover share one remediation gate (aidc.failover.remediation).

Specification: a runbook's quarantine step passes the same circuit breaker as failover and
counts in its window; an open breaker fails the step (refused: breaker_open) and acts on
nothing; on a node remediated policy.escalation.node_remediations times, a destructive step
that policy would let run alone waits for a person's approval.
"""

from __future__ import annotations

import pytest

from aidc.audit.log import AuditLog
from aidc.failover.remediation import RemediationGate
from aidc.spec import Policy, parse_spec
from aidc.store import Store
from runbook_fakes import QUARANTINE_AND_NOTIFY, alert

BROKEN_Q = 'broken{Hostname="gpu-1"}'


@pytest.fixture
def gate(tmp_path):
    def make(**policy):
        spec = parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM",
                                                         "gpus_per_node": 2}], "policy": policy})
        made = RemediationGate(spec, Store(tmp_path / "failover.db"), AuditLog(tmp_path / "gate-audit.db"))
        opened.append(made)
        return made

    opened: list[RemediationGate] = []
    yield make
    for g in opened:
        g.store.close()
        g.audit.close()


def engine_with(make_engine, gate, **policy):
    engine = make_engine(QUARANTINE_AND_NOTIFY, policy=Policy(max_unavailable=4, **policy))
    engine.remediation = gate
    return engine


def test_a_runbook_quarantine_counts_in_the_breaker_window_failover_uses(make_engine, fakes, gate):
    shared = gate(breaker={"max_quarantines": 2})
    engine = engine_with(make_engine, shared)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    assert run.status == "done" and ("quarantine", "gpu-1") in fakes.scheduler.calls
    assert [(q["node"], q["source"]) for q in shared.recent_quarantines()] == [("gpu-1", "runbook")]


def test_an_open_breaker_fails_the_quarantine_step_and_acts_on_nothing(make_engine, fakes, gate):
    shared = gate(breaker={"max_quarantines": 1})
    with shared.store.transaction():
        shared.record("gpu-0", "reboot_node", "failover", "event 1")
    assert shared.admit("gpu-3", ref="event 2")  # failover tripped it
    engine = engine_with(make_engine, shared)
    fakes.metrics.values[BROKEN_Q] = [1.0]
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    out = engine.state.steps(run.id)[1]
    assert run.status == "failed" and (out.step_id, out.result["refused"]) == ("out", "breaker_open")
    assert "circuit breaker open" in out.result["error"] and fakes.scheduler.calls == []


def test_a_node_remediated_too_often_waits_for_a_person_even_where_policy_auto_approves(make_engine, fakes, gate):
    shared = gate(escalation={"node_remediations": 2}, breaker={"max_quarantines": 100})
    with shared.store.transaction():
        shared.record("gpu-1", "reset_gpu", "failover", "event 1")
        shared.record("gpu-1", "reboot_node", "failover", "event 2")
    engine = engine_with(make_engine, shared, runbook_auto_approve=["quarantine"])
    fakes.metrics.values[BROKEN_Q] = [1.0]
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1")).run_id)
    out = engine.state.steps(run.id)[1]
    assert run.status == "failed" and "remediated 2 times" in out.result["error"]
    assert fakes.scheduler.calls == []
    # Another node, never remediated, still runs under policy alone.
    fakes.metrics.values['broken{Hostname="gpu-2"}'] = [1.0]
    other = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-2", fingerprint="fp2")).run_id)
    assert other.status == "done"


RECERTIFY = """
name: recertify
title: Recertify a node
summary: The node passed its burn-in again; return it to service.
trigger:
  alerts: [{alertname: NodeRecertified}]
guards: [{guard: node_known}]
steps:
  - {id: back, kind: release, reason: "burn-in passed"}
"""


def test_a_release_step_does_not_return_a_repeat_offender(make_engine, fakes, gate):
    import json

    from aidc.failover.offenders import OFFENDERS_KEY

    shared = gate()
    with shared.store.transaction():
        shared.store.put(OFFENDERS_KEY, json.dumps({"gpu-1/gpu0": {
            "target": "gpu-1/gpu0", "node": "gpu-1", "gpu": 0, "reason": "faults weighing 4.5 within 30 days"}}))
    engine = make_engine(RECERTIFY, policy=Policy(max_unavailable=4, runbook_auto_approve=["quarantine", "release"]))
    engine.remediation = shared
    run = engine.execute(engine.submit_alert(alert("NodeRecertified", "gpu-1")).run_id)
    out = engine.state.steps(run.id)[0]
    assert run.status == "failed" and out.result["refused"] == "repeat_offender"
    assert "gpu-1/gpu0" in out.result["error"] and fakes.scheduler.calls == []
    # A node that is no offender is released by the same runbook.
    other = engine.execute(engine.submit_alert(alert("NodeRecertified", "gpu-2", fingerprint="fp2")).run_id)
    assert other.status == "done" and ("release", "gpu-2") in fakes.scheduler.calls
