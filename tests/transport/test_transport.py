"""Fault events from node agents to a controller on another host, over HTTPS with mutual TLS.

Specification: an event in an agent's store reaches the controller's store exactly once,
whichever side restarts and however often a batch is sent; the failover controller acts on it
once; a certificate for one node cannot report faults of another; while the controller is
away, events wait in the agent's store and go when it is back. Real TLS on loopback with a
throwaway CA; the controller's listener and the agent's forwarder run on threads here
(test_cli_transport.py runs them as the `aidc` processes).
"""

from __future__ import annotations

import http.client
import ssl
import threading

import pytest

from aidc.audit.log import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.scheduler import LabScheduler
from aidc.spec import load_stack
from aidc.store import Store
from aidc.transport import wire
from aidc.transport.forwarder import Forwarder, TransportError
from tests.transport.transport_helpers import NODES, agent_tls, wait_for


def fault(node: str, xid: int = 79) -> FaultEvent:
    action = Action.REBOOT_NODE if xid == 79 else Action.RESTART_APP
    return FaultEvent(node, FaultKind.XID, action, f"XID {xid} on 0000:17:00.0", "kmsg", gpu=0,
                      pci="0000:17:00.0", xid=xid)


def append(store: Store, *events: FaultEvent) -> list[int]:
    with store.transaction():
        return [store.append(e) for e in events]


def forwarder(store_path, node, ctl, pki, cert=None, **kw) -> Forwarder:
    kw.setdefault("backoff_base_s", 0.02)
    kw.setdefault("backoff_max_s", 0.2)
    return Forwarder(store_path, node, ctl.url, agent_tls(pki, cert or node), **kw)


def received(ctl) -> list[tuple[str, FaultEvent]]:
    store = Store(ctl.store_path)
    try:
        rows = store._db.execute("SELECT key, payload FROM events ORDER BY id").fetchall()
        return [(k, FaultEvent.from_json(p)) for k, p in rows]
    finally:
        store.close()


@pytest.fixture
def agent_store(tmp_path):
    store = Store(tmp_path / "agent" / "store.db")
    yield store
    store.close()


def running(fwd: Forwarder):
    stop = threading.Event()
    thread = threading.Thread(target=fwd.run, args=(stop,), daemon=True)
    thread.start()

    def halt():
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive()
    return halt


def test_the_same_batch_sent_twice_is_stored_once_and_quarantines_once(controller, pki, agent_store, tmp_path):
    ctl = controller()
    [event_id] = append(agent_store, fault("gpu-1"))
    fwd = forwarder(agent_store.path, "gpu-1", ctl, pki)
    rows = agent_store.unforwarded("gpu-1")
    body = wire.encode([(key, event) for _, key, event in rows])
    # The first answer is "lost": the agent never marked the event forwarded, so it sends it again.
    first, second = fwd._post(body), fwd._post(body)
    assert first == {"accepted": [rows[0][1]], "duplicates": []}
    assert second == {"accepted": [], "duplicates": [rows[0][1]]}
    assert fwd.forward_once(agent_store) == 1  # and once more through the normal path
    assert agent_store.unforwarded("gpu-1") == []
    assert [k for k, _ in received(ctl)] == [f"gpu-1:{agent_store.store_id}:{event_id}"]

    lab = tmp_path / "lab"
    for node in NODES:
        (lab / "nodes" / node).mkdir(parents=True)
    store, audit = Store(ctl.store_path), AuditLog(tmp_path / "failover-audit.db")
    decisions = FailoverController(load_stack("lab"), store, audit, LabScheduler(lab)).run_once()
    assert [(d.node, d.verdict) for d in decisions] == [("gpu-1", "quarantine")]
    assert [r.kind for r in audit.records()].count("failover.action") == 1
    store.close()
    audit.close()


def test_a_certificate_for_one_node_cannot_report_faults_of_another(controller, pki, agent_store):
    ctl = controller()
    append(agent_store, fault("gpu-1"))
    fwd = forwarder(agent_store.path, "gpu-1", ctl, pki, cert="gpu-0")
    with pytest.raises(TransportError, match="403: certificate CN=gpu-0 may not report faults of node 'gpu-1'"):
        fwd.forward_once(agent_store)
    assert received(ctl) == []
    assert len(agent_store.unforwarded("gpu-1")) == 1  # kept: fixing the certificate delivers it
    assert any("403 POST /v1/events" in line and "CN=gpu-0" in line for line in ctl.lines)
    audit = AuditLog(ctl.audit_path)
    [refusal] = [r for r in audit.records() if r.kind == "transport.refused"]
    assert refusal.node == "gpu-1" and refusal.payload["client"] == "CN=gpu-0"
    audit.close()


def test_a_relay_may_report_for_the_nodes_the_spec_lists_for_it(controller, pki, agent_store):
    ctl = controller(relays={"relay": {"gpu-1"}})
    append(agent_store, fault("gpu-1"))
    assert forwarder(agent_store.path, "gpu-1", ctl, pki, cert="relay").forward_once(agent_store) == 1
    assert [e.node for _, e in received(ctl)] == ["gpu-1"]


@pytest.mark.parametrize("listed", [set(), {"gpu-1"}, {"gpu-1", "gpu-2"}])
def test_a_relay_may_not_report_for_a_node_the_spec_does_not_list_for_it(controller, pki, tmp_path, listed):
    ctl = controller(relays={"relay": listed} if listed else {})
    store = Store(tmp_path / "relayed.db")
    for node in ("gpu-0", "gpu-3", "gpu-1", "gpu-0"):
        append(store, fault(node))
    fwd = [forwarder(store.path, node, ctl, pki, cert="relay") for node in ("gpu-0", "gpu-3")]
    for f in fwd:
        with pytest.raises(TransportError, match="403: certificate CN=relay may not report faults of node"):
            f.forward_once(store)
    assert received(ctl) == []
    audit = AuditLog(ctl.audit_path)
    refusals = [r for r in audit.records() if r.kind == "transport.refused"]
    # One record per refused batch, however many of its events it names (two for gpu-0 here).
    assert [(r.node, r.payload["count"], r.payload["transport"]) for r in refusals] == \
        [("gpu-0", 2, "https"), ("gpu-3", 1, "https")]
    audit.close()
    if "gpu-1" in listed:
        assert forwarder(store.path, "gpu-1", ctl, pki, cert="relay").forward_once(store) == 1
    store.close()


def test_a_client_certificate_from_another_ca_is_refused_in_the_handshake(controller, pki, agent_store):
    ctl = controller()
    append(agent_store, fault("gpu-0"))
    with pytest.raises(TransportError, match="unreachable"):
        forwarder(agent_store.path, "gpu-0", ctl, pki, cert="intruder").forward_once(agent_store)
    assert received(ctl) == []
    wait_for("the refused handshake in the log", lambda: any("TLS handshake refused" in l for l in ctl.lines))


def test_events_of_a_node_not_in_the_cluster_are_refused(controller, pki, tmp_path):
    ctl = controller(relays={"relay": {"gpu-0"}})
    store = Store(tmp_path / "stray.db")
    append(store, fault("gpu-99"))
    with pytest.raises(TransportError, match="422: 'gpu-99' is not a node of this cluster"):
        forwarder(store.path, "gpu-99", ctl, pki, cert="relay").forward_once(store)
    store.close()


def test_events_of_names_that_are_not_nodes_are_audited_and_a_flood_adds_few_records(controller, pki, tmp_path):
    ctl = controller(relays={"relay": {"gpu-0"}})
    store = Store(tmp_path / "stray.db")
    # Names the wire format lets through (it refuses '/', NUL and look-alikes itself with 400).
    hostile = ["..", ".hidden", "gpu-99"] + [f"ghost-{i}" for i in range(17)]
    for name in hostile:
        append(store, fault(name))
        with pytest.raises(TransportError, match="422"):
            forwarder(store.path, name, ctl, pki, cert="relay").forward_once(store)
    store.close()
    ctl.stop()  # the listener writes the window's summary when it stops
    assert received(ctl) == []
    with AuditLog(ctl.audit_path) as audit:
        refused = [r.payload for r in audit.records(kind="node.refused_unknown")]
    assert {p["where"] for p in refused} == {"ingest"} and {p.get("source") for p in refused[:1]} == {"CN=relay"}
    assert sum(p["refused"] for p in refused) == len(hostile)
    assert len(refused) < len(hostile)


def test_plain_requests_that_are_not_a_batch_get_400_and_the_listener_lives_on(controller, pki, agent_store):
    ctl = controller()
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
    ctx.load_cert_chain(str(pki["gpu-0"].cert), str(pki["gpu-0"].key))
    conn = http.client.HTTPSConnection("127.0.0.1", ctl.port, timeout=10, context=ctx)
    conn.request("POST", wire.PATH, body=b'{"events": [{"key": "x", "event": NaN}]}')
    resp = conn.getresponse()
    assert resp.status == 400 and b"NaN is not JSON" in resp.read()
    conn.close()
    append(agent_store, fault("gpu-0"))
    assert forwarder(agent_store.path, "gpu-0", ctl, pki).forward_once(agent_store) == 1


def test_events_wait_while_the_controller_is_down_and_go_when_it_returns(controller, pki, agent_store):
    ctl = controller(start=False)
    fwd = forwarder(agent_store.path, "gpu-0", ctl, pki)
    halt = running(fwd)
    append(agent_store, *[fault("gpu-0", 13) for _ in range(5)])
    wait_for("a few failed tries", lambda: fwd.failures >= 3)
    assert agent_store.outbox_depth("gpu-0") == 5 and fwd.forwarded == 0
    ctl.start()
    wait_for("the queue to drain", lambda: agent_store.outbox_depth("gpu-0") == 0)
    halt()
    assert len(received(ctl)) == 5 and fwd.failures == 0


def test_a_controller_restarted_while_an_agent_forwards_loses_and_repeats_nothing(controller, pki, agent_store):
    ctl = controller()
    fwd = forwarder(agent_store.path, "gpu-0", ctl, pki, batch_size=3)
    halt = running(fwd)
    ids = []
    for round_ in range(3):
        for _ in range(10):
            ids += append(agent_store, fault("gpu-0", 13))
        ctl.stop()  # mid-stream: some batches in flight or queued
        tried = fwd.failed_tries
        ids += append(agent_store, fault("gpu-0", 13))
        wait_for("the agent to find the controller gone", lambda: fwd.failed_tries > tried)
        ctl.start()
    wait_for("every event forwarded", lambda: agent_store.outbox_depth("gpu-0") == 0)
    halt()
    assert fwd.failed_tries >= 1  # the restarts did interrupt it
    keys = [k for k, _ in received(ctl)]
    assert keys == [f"gpu-0:{agent_store.store_id}:{i}" for i in ids]  # all, once each, in order


def test_an_agent_restarted_with_unforwarded_events_sends_them_after_the_restart(controller, pki, tmp_path):
    ctl = controller(start=False)
    path = tmp_path / "agent" / "store.db"
    store = Store(path)
    append(store, fault("gpu-0"), fault("gpu-0", 13))
    halt = running(forwarder(path, "gpu-0", ctl, pki))  # the controller is down: nothing goes
    halt()
    store.close()
    ctl.start()
    store = Store(path)  # the "restarted" agent: a new process would open the same file
    fwd = forwarder(path, "gpu-0", ctl, pki)
    halt = running(fwd)
    wait_for("the old events delivered", lambda: store.outbox_depth("gpu-0") == 0)
    halt()
    assert [e.xid for _, e in received(ctl)] == [79, 13] and fwd.forwarded == 2
    store.close()


def test_a_recreated_agent_store_gets_new_keys_so_its_events_are_not_taken_for_old_ones(controller, pki, tmp_path):
    ctl = controller()
    path = tmp_path / "agent" / "store.db"
    for _ in range(2):
        store = Store(path)
        append(store, fault("gpu-0"))
        assert forwarder(path, "gpu-0", ctl, pki).forward_once(store) == 1
        store.close()
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    keys = [k for k, _ in received(ctl)]
    assert len(keys) == 2 and keys[0].endswith(":1") and keys[1].endswith(":1") and keys[0] != keys[1]


def test_only_this_nodes_unhandled_events_leave_a_shared_store(agent_store):
    ids = append(agent_store, fault("gpu-0"), fault("gpu-1"), fault("gpu-0", 13))
    agent_store.mark_handled(ids[2], "no_action")  # a local controller decided it already
    assert [i for i, _, _ in agent_store.unforwarded("gpu-0")] == [ids[0]]


def test_a_store_made_before_the_transport_gets_the_columns_and_keys_for_its_old_events(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, payload TEXT NOT NULL,
                             created_at REAL NOT NULL, handled_at REAL, outcome TEXT);
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);""")
    old.execute("INSERT INTO events(node, payload, created_at) VALUES ('gpu-0', ?, 0)", (fault("gpu-0").to_json(),))
    old.commit()
    old.close()
    store = Store(path)
    [(event_id, key, event)] = store.unforwarded("gpu-0")
    assert key == f"gpu-0:{store.store_id}:{event_id}" and event.xid == 79
    assert Store(path).store_id == store.store_id  # the id is made once, when first needed
    assert store.ingest(key, fault("gpu-0")) is None  # already here: ignored
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # the key is unique in the schema itself
        store._db.execute("INSERT INTO events(node, payload, created_at, key) VALUES ('gpu-0', '{}', 0, ?)", (key,))
    store.close()


def test_a_store_the_forwarder_cannot_open_yet_is_retried_not_fatal(controller, pki, tmp_path):
    ctl = controller()
    path = tmp_path / "agent" / "store.db"
    path.mkdir(parents=True)  # a directory where the store belongs: SQLite cannot open it
    lines: list[str] = []
    fwd = forwarder(path, "gpu-0", ctl, pki, log=lines.append)
    halt = running(fwd)
    wait_for("a failed try", lambda: fwd.failed_tries >= 1)
    assert "unable to open database file" in lines[0] and "unknown event(s) queued" in lines[0]
    path.rmdir()
    store = Store(path)
    append(store, fault("gpu-0"))
    wait_for("the event delivered", lambda: store.outbox_depth("gpu-0") == 0)
    halt()
    store.close()
    assert len(received(ctl)) == 1
