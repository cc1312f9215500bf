"""The controller at fleet scale (issue 21): batched decisions and audit commits, the loop woken
by the listener, specs of 100,000 nodes, and the bench that measures it (bench/fleet_scale.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aidc import polling
from aidc.audit import AuditLog
from aidc.errors import SpecError
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import BATCH, FailoverController
from aidc.spec import MAX_NODES, parse_stack_text
from aidc.store import Store

ROOT = Path(__file__).resolve().parents[1]


class CountingScheduler:
    name = "counting"

    def __init__(self, fail: bool = False):
        self.calls: list[str] = []
        self.fail = fail

    def quarantine(self, node, reason, event=None):
        if self.fail:
            raise RuntimeError("scheduler down")
        self.calls.append(node)

    def release(self, node, reason):
        pass

    def state(self, node):
        return "quarantined" if node in self.calls else "in_service"


class TurnCounter:
    """A probe (aidc.probes) that counts the loop's turns."""

    def __init__(self):
        self.turns = 0

    def ready(self):
        pass

    def turned(self, leader):
        self.turns += 1


def stack(nodes: int, relays: str = "") -> str:
    return (f"config:\n  aidc:cluster:\n    name: t\n    scheduler: lab\n    node_pools:\n"
            f"      - {{name: gpu, count: {nodes}, gpu_model: SIM, gpus_per_node: 8}}\n"
            f"    policy: {{max_unavailable: 2}}\n" + (f"    transport:\n      relays:\n{relays}" if relays else ""))


def fault(node: str, xid: int = 43, action: Action = Action.IGNORE) -> FaultEvent:
    return FaultEvent(node, FaultKind.XID, action, f"XID {xid}", "kmsg", gpu=0, xid=xid)


@pytest.fixture
def env(store_and_audit):
    return store_and_audit


# --- the spec ----------------------------------------------------------------------------------------
def test_a_fleet_of_max_nodes_loads_with_relays_named_by_range():
    racks = "".join(f"        rack-{r}: ['gpu-[{r * 50_000}-{r * 50_000 + 49_999}]']\n" for r in range(2))
    spec = parse_stack_text(stack(MAX_NODES, racks))
    assert len(spec.nodes()) == MAX_NODES == 100_000
    assert spec.transport.relays["rack-1"][:2] == ["gpu-50000", "gpu-50001"]
    assert len(spec.transport.relays["rack-1"]) == 50_000


@pytest.mark.parametrize("relays, says", [
    ("        rack-0: ['gpu-[99990-100005]']\n", "not a node of this cluster"),
    ("        rack-0: ['gpu-[9-3]']\n", "A <= B"),
])
def test_a_relay_range_beyond_the_fleet_or_backwards_is_refused(relays, says):
    with pytest.raises(SpecError, match=says.replace("[", r"\[")):
        parse_stack_text(stack(100_000, relays))


def test_more_nodes_than_max_nodes_is_refused():
    with pytest.raises(SpecError, match="less than or equal to 100000"):
        parse_stack_text(stack(MAX_NODES + 1))  # one pool
    two = stack(60_000).replace("    policy:", "      - {name: cpu, count: 40001, gpu_model: SIM, gpus_per_node: 8}\n"
                                "    policy:")
    with pytest.raises(SpecError, match="at most 100000 nodes in all pools"):
        parse_stack_text(two)


# --- batched decisions ---------------------------------------------------------------------------------
def test_a_batch_of_decisions_is_one_audit_commit_and_one_anchor_update(env, monkeypatch):
    store, audit = env
    spec = parse_stack_text(stack(100))
    for i in range(40):
        store.append(fault(f"gpu-{i}"))
    anchors = []
    real = AuditLog._write_anchor
    monkeypatch.setattr(AuditLog, "_write_anchor", lambda self, *a, **k: (anchors.append(a), real(self, *a, **k)))
    decisions = FailoverController(spec, store, audit, CountingScheduler()).run_once()
    assert [d.verdict for d in decisions] == ["no_action"] * 40
    assert len(anchors) == 1 and anchors[0][0] == len(audit.records())  # the anchor names the batch's last
    assert audit.verify().ok and store.pending() == []


def test_a_batch_that_fails_midway_commits_nothing_and_its_events_stay_pending(env, monkeypatch):
    store, audit = env
    spec = parse_stack_text(stack(100))
    ids = [store.append(fault(f"gpu-{i}")) for i in range(5)]
    ctl = FailoverController(spec, store, audit, CountingScheduler())
    real = ctl.handle
    monkeypatch.setattr(ctl, "handle", lambda event_id, event: real(event_id, event) if event_id != ids[3]
                        else (_ for _ in ()).throw(RuntimeError("crash mid-batch")))
    with pytest.raises(RuntimeError, match="crash mid-batch"):
        ctl.run_once()
    assert [i for i, _ in store.pending()] == ids and audit.records() == []
    monkeypatch.setattr(ctl, "handle", real)
    assert [d.verdict for d in ctl.run_once()] == ["no_action"] * 5  # decided once, after the "restart"
    assert len(audit.records(kind="failover.decision")) == 5 and audit.verify().ok


def test_a_storm_in_one_batch_quarantines_up_to_max_unavailable_and_refuses_the_rest(env):
    store, audit = env
    spec = parse_stack_text(stack(100))
    for i in range(6):
        store.append(fault(f"gpu-{i}", 79, Action.REBOOT_NODE))
    sched = CountingScheduler()
    verdicts = [d.verdict for d in FailoverController(spec, store, audit, sched).run_once()]
    assert verdicts == ["quarantine"] * 2 + ["refused_blast_radius"] * 4
    assert sched.calls == ["gpu-0", "gpu-1"]  # called after the batch's intents were committed
    assert sorted(store.nodes_in_state("quarantined")) == ["gpu-0", "gpu-1"]


def test_a_quarantine_the_scheduler_fails_keeps_its_committed_intent_for_the_retry(env):
    store, audit = env
    spec = parse_stack_text(stack(100))
    store.append(fault("gpu-7", 79, Action.REBOOT_NODE))
    ctl = FailoverController(spec, store, audit, CountingScheduler(fail=True))
    assert [d.verdict for d in ctl.run_once()] == ["error"]
    assert store.node_state("gpu-7") == "quarantining" and len(store.pending()) == 1
    ctl.scheduler.fail = False
    assert [d.verdict for d in ctl.run_once()] == ["quarantine"]
    assert store.node_state("gpu-7") == "quarantined" and ctl.scheduler.calls == ["gpu-7"]


def test_events_that_all_wait_out_their_backoff_do_not_make_the_loop_look_again_at_once(env, monkeypatch):
    from aidc.failover import controller

    store, audit = env
    monkeypatch.setattr(controller, "BATCH", 3)
    for i in range(3):
        store.append(fault(f"gpu-{i}"))
    sched = CountingScheduler()
    sched.known_nodes = lambda: (_ for _ in ()).throw(RuntimeError("API server down"))
    ctl = FailoverController(parse_stack_text(stack(10)), store, audit, sched)
    assert [d.verdict for d in ctl.run_once(backoff=True)] == ["error"] * 3
    assert ctl.run_once(backoff=True) == []  # a full page, every event in its backoff
    assert ctl._more is False  # so the loop waits for its poll or a wake, instead of spinning


def test_the_loop_decides_more_events_than_a_batch_holds_without_waiting_for_a_poll(tmp_path):
    store, audit = Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db")
    spec = parse_stack_text(stack(3 * BATCH))
    with store.transaction():
        for i in range(2 * BATCH + 7):
            store.append(fault(f"gpu-{i}"))
    ctl = FailoverController(spec, store, audit, CountingScheduler())
    stop = threading.Event()
    loop = threading.Thread(target=ctl.run, args=(stop, 3600.0), daemon=True)  # an hour between polls
    loop.start()
    try:
        polling.wait_for("every event decided", lambda: not store.pending(), 60)
    finally:
        stop.set()
        ctl.wake.set()
        loop.join(timeout=30)
    assert len(audit.records(kind="failover.decision")) == 2 * BATCH + 7


def test_new_events_wake_the_loop_instead_of_waiting_for_its_next_poll(tmp_path):
    store, audit = Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db")
    ctl = FailoverController(parse_stack_text(stack(10)), store, audit, CountingScheduler())
    ctl.probe = TurnCounter()
    stop = threading.Event()
    loop = threading.Thread(target=ctl.run, args=(stop, 3600.0), daemon=True)  # an hour between polls
    loop.start()
    try:
        polling.wait_for("the loop's first turn", lambda: ctl.probe.turns, 30)
        writer = Store(tmp_path / "state.db")  # the listener's own connection
        with writer.transaction():
            writer.append(fault("gpu-3"))
        writer.close()
        ctl.wake.set()  # what the listener does after its commit (IngestServer.on_ingest)
        polling.wait_for("the event decided", lambda: not store.pending(), 30)
    finally:
        stop.set()
        ctl.wake.set()
        loop.join(timeout=30)


# --- the bench ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_fleet_bench_at_1000_nodes_reports_every_field_and_loses_nothing():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "agents")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet_scale.py"), "--nodes", "1000",
                           "--duration", "10", "--storm", "0.02", "--json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout)
    for field in ("nodes", "offered_events_per_s", "handled_events_per_s", "lost", "decision_ms_p50",
                  "decision_ms_p99", "controller_rss_mb", "controller_cpu_pct", "generator_cpu_pct",
                  "store_bytes_per_million_events", "api_requests_per_event", "storm_all_decided_s", "breaker"):
        assert result[field] is not None, field
    assert result["nodes"] == 1000 and result["lost"] == 0
    assert result["events"] == result["decided"] > 0
    # 20 storm nodes, max_unavailable 1% of 1000 = 10: ten quarantines, the rest refused, breaker closed.
    assert result["storm_verdicts"] == {"quarantine": 10, "refused_blast_radius": 10}
    assert result["scheduler_requests"]["quarantine"] == 10
    assert result["breaker"].get("open") is not True
