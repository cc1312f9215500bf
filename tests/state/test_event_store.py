"""The failover event store's contract, held on every state backend (SQLite and a real
PostgreSQL): events by idempotency key, the outbox, decisions, remediation history, node states
and the key/value settings the breaker latch and escalation keep. Reopening is a restart."""

from __future__ import annotations

import pytest

from aidc.events import Action, FaultEvent, FaultKind
from aidc.state import open_event_store, registered_backends


def _event(node: str = "gpu-0", xid: int = 79) -> FaultEvent:
    return FaultEvent(node=node, kind=FaultKind.XID, action=Action.REBOOT_NODE, message=f"Xid {xid}",
                      source="kmsg", gpu=0, xid=xid, observed_at=1000.0)


@pytest.fixture
def store(state_location):
    backend, location = state_location
    s = open_event_store(backend, location)
    yield s
    s.close()


def test_both_backends_are_registered_by_name():
    assert registered_backends() == ["sqlite", "postgres"]


def test_appended_events_are_keyed_by_source_store_and_id_and_come_back_in_order(store):
    with store.transaction():
        first = store.append(_event("gpu-0", 79))
    with store.transaction():
        second = store.append(_event("gpu-1", 48), source="relay-0")
    assert second > first
    assert store.event_key(first) == f"gpu-0:{store.store_id}:{first}"
    assert store.event_key(second) == f"relay-0:{store.store_id}:{second}"
    assert store.has_key(store.event_key(first))
    assert [(i, e.node, e.xid) for i, e in store.pending()] == [(first, "gpu-0", 79), (second, "gpu-1", 48)]
    assert store.pending()[0][1] == _event("gpu-0", 79)


def test_a_forwarded_event_is_one_event_however_often_it_arrives(store):
    first = store.ingest("gpu-3:abc:7", _event("gpu-3"))
    again = store.ingest("gpu-3:abc:7", _event("gpu-3"))
    assert first is not None and again is None
    assert [i for i, _e, _o in store.events()] == [first]
    assert store.unforwarded("gpu-3") == []  # ingested events are held here: nothing to forward


def test_outbox_lists_a_nodes_unforwarded_events_until_marked(store):
    with store.transaction():
        ids = [store.append(_event("gpu-0", x)) for x in (79, 48, 63)]
        store.append(_event("gpu-1"))
    assert [i for i, _k, _e in store.unforwarded("gpu-0", limit=2)] == ids[:2]
    assert store.outbox_depth("gpu-0") == 3
    store.mark_forwarded(ids[:2])
    assert [(i, k) for i, k, _e in store.unforwarded("gpu-0")] == [(ids[2], store.event_key(ids[2]))]
    assert store.outbox_depth("gpu-0") == 1


def test_deferred_events_stay_pending_but_not_undecided_and_handled_ones_leave(store):
    with store.transaction():
        a, b, c = (store.append(_event(f"gpu-{n}")) for n in range(3))
    store.mark_deferred(a, "deferred: capacity")
    store.mark_handled(b, "quarantined")
    assert [i for i, _e in store.pending()] == [a, c]
    assert [i for i, _e in store.pending(undecided_only=True)] == [c]
    assert (store.outcome(a), store.outcome(b), store.outcome(c)) == ("deferred: capacity", "quarantined", None)
    store.mark_deferred(b, "deferred: again")  # a handled event is never reopened
    assert store.outcome(b) == "quarantined"
    assert store.oldest_undecided_at() is not None
    store.mark_handled(c, "ignored")
    assert store.oldest_undecided_at() is None


def test_node_history_is_newest_first_up_to_the_given_event(store):
    with store.transaction():
        ids = [store.append(_event("gpu-0", x)) for x in (79, 48, 63)]
        store.append(_event("gpu-1"))
    assert [(i, e.xid) for i, e, _o in store.node_history("gpu-0", ids[1])] == [(ids[1], 48), (ids[0], 79)]
    assert [i for i, _e, _o in store.events("gpu-0")] == ids


def test_a_remediation_counts_once_per_source_and_ref(store):
    store.record_remediation("gpu-0", "reboot_node", "failover", "event 1", at=100.0)
    store.record_remediation("gpu-0", "reboot_node", "failover", "event 1", at=150.0)
    store.record_remediation("gpu-1", "reset_gpu", "runbook", "run 9", at=200.0)
    assert store.remediations(since=0) == [
        {"node": "gpu-0", "action": "reboot_node", "source": "failover", "ref": "event 1", "at": 100.0},
        {"node": "gpu-1", "action": "reset_gpu", "source": "runbook", "ref": "run 9", "at": 200.0}]
    assert [r["node"] for r in store.remediations(since=150.0)] == ["gpu-1"]
    assert store.remediations(since=0, node="gpu-1")[0]["ref"] == "run 9"


def test_node_states_and_settings_survive_a_reopen(state_location):
    backend, location = state_location
    store = open_event_store(backend, location)
    assert store.node_state("gpu-0") == "in_service"
    store.set_node_state("gpu-0", "quarantining", "xid 79", "failover")
    store.set_node_state("gpu-0", "quarantined", "xid 79", "failover")
    store.set_node_state("gpu-1", "quarantined", "by hand", "alice")
    store.put("breaker.latched", "1")
    store.put("breaker.latched", "2")
    store.put("gone", "x")
    store.delete("gone")
    with store.transaction():
        event_id = store.append(_event())
    store_id = store.store_id
    store.close()

    again = open_event_store(backend, location)
    try:
        assert again.store_id == store_id  # a restart keeps the store id: keys stay unique
        assert sorted(again.nodes_in_state("quarantined")) == ["gpu-0", "gpu-1"]
        assert again.nodes_in_state("quarantining") == []
        assert (again.get("breaker.latched"), again.get("gone"), again.get("gone", "d")) == ("2", None, "d")
        assert [i for i, _e in again.pending()] == [event_id]
    finally:
        again.close()


def test_a_failed_transaction_leaves_nothing_behind(store):
    with pytest.raises(RuntimeError), store.transaction():
        store.append(_event())
        store.put("half", "done")
        raise RuntimeError("crash between the two writes")
    assert store.pending() == [] and store.get("half") is None
