"""Faults on Kubernetes: agents publish node conditions and Events; the controller's watch turns
each into one FaultEvent in its store, across repeats, relists (410 Gone) and restarts."""

from __future__ import annotations

import threading

import pytest

from aidc.audit import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.k8s_faults import KubernetesFaultSource, NodeWatch, fault_condition, fault_from_condition
from aidc.failover.kubernetes import KubernetesScheduler
from aidc.health.k8s_publisher import NodeFaultPublisher
from aidc.spec import Kubernetes, parse_spec
from aidc.store import Store

XID79 = FaultEvent(node="gpu-1", kind=FaultKind.XID, action=Action.REBOOT_NODE,
                   message="XID 79: GPU has fallen off the bus", source="kmsg", gpu=0, xid=79)


def test_the_condition_round_trips_the_fault_and_reads_as_text():
    cond = fault_condition(XID79, "gpu-1:store-ab12:17")
    assert cond["reason"] == "Xid79" and cond["message"].startswith("XID 79: GPU has fallen off the bus [aidc ")
    key, event = fault_from_condition("gpu-1", cond)
    assert key == "gpu-1:store-ab12:17"
    assert (event.kind, event.action, event.gpu, event.xid) == (XID79.kind, XID79.action, 0, 79)


def test_a_condition_without_the_agents_tag_is_not_a_fault():
    assert fault_from_condition("gpu-1", {"type": "AidcGpuHealthy", "status": "False", "reason": "Xid79",
                                          "message": "XID 79 on gpu 0 asks for reboot_node"}) is None
    healthy = {**fault_condition(XID79, "k"), "status": "True"}
    assert fault_from_condition("gpu-1", healthy) is None


def test_the_agent_publishes_a_condition_and_a_valid_event_and_a_retry_is_harmless(apiserver):
    apiserver.add_node("gpu-1")
    publisher = NodeFaultPublisher(apiserver.client("agent"), "gpu-1")
    publisher.publish("gpu-1:s:1", XID79)
    publisher.publish("gpu-1:s:1", XID79)
    assert len(apiserver.events) == 1
    ev = apiserver.events[0]
    assert ev["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": "gpu-1"} and ev["type"] == "Warning"
    assert {w[1] for w in apiserver.writes("agent")} == {"/api/v1/nodes/gpu-1/status", "/api/v1/namespaces/default/events"}
    assert apiserver.invalid == []


def test_the_controller_appends_each_fault_once_across_repeats_relists_and_restarts(apiserver, tmp_path):
    apiserver.add_node("gpu-0")
    apiserver.add_node("gpu-1")
    store = Store(tmp_path / "state.db")
    source = KubernetesFaultSource(store, NodeWatch(apiserver.client("controller"), timeout_s=1))
    NodeFaultPublisher(apiserver.client("agent"), "gpu-1").publish("gpu-1:s:1", XID79)
    source.watch.watch_once(source.handle)
    assert [e.node for _, e in store.pending()] == ["gpu-1"]
    # The same condition seen again (another node changes; the watch delivers gpu-1 again on relist).
    apiserver.set_node("gpu-0", lambda n: n["metadata"]["labels"].update(x="1"))
    apiserver.compact()
    source.watch.watch_once(source.handle)   # 410 Gone: forget the version
    source.watch.watch_once(source.handle)   # relist
    assert source.watch.relists == 2
    restarted = KubernetesFaultSource(Store(tmp_path / "state.db"), NodeWatch(apiserver.client("controller"), timeout_s=1))
    restarted.watch.watch_once(restarted.handle)
    assert len(store.pending()) == 1
    # A second fault on the node is a new event.
    NodeFaultPublisher(apiserver.client("agent"), "gpu-1").publish("gpu-1:s:2", XID79)
    restarted.watch.watch_once(restarted.handle)
    assert len(store.pending()) == 2


def test_the_controllers_own_quarantine_condition_is_not_read_back_as_a_fault(apiserver, tmp_path):
    apiserver.add_node("gpu-1")
    KubernetesScheduler(apiserver.client(), Kubernetes(promote_spares=False)).quarantine("gpu-1", "XID 79 on gpu 0")
    store = Store(tmp_path / "state.db")
    source = KubernetesFaultSource(store, NodeWatch(apiserver.client(), timeout_s=1))
    source.watch.watch_once(source.handle)
    assert store.pending() == []


def test_the_source_keeps_going_while_the_api_server_is_away(apiserver, tmp_path):
    apiserver.add_node("gpu-1")
    store = Store(tmp_path / "state.db")
    source = KubernetesFaultSource(store, NodeWatch(apiserver.client(), timeout_s=1))
    errors, stop = [], threading.Event()
    NodeFaultPublisher(apiserver.client("agent"), "gpu-1").publish("gpu-1:s:1", XID79)
    apiserver.fail_next(503, 2)
    t = threading.Thread(target=source.run, args=(stop, errors.append, 0.05), daemon=True)
    t.start()
    for _ in range(100):
        if store.pending():
            break
        stop.wait(0.05)
    stop.set()
    t.join(5)
    assert errors and len(store.pending()) == 1


# --- a node speaks only for itself ------------------------------------------------------------------
# The incident: one agent set AidcGpuHealthy=False on two healthy nodes (the fake server, like an API
# server without aidc's admission policy, lets it). The condition names the fault's source in its key
# (`<node>:<store id>:<id>`); a condition on one node whose key names another is refused, audited.

def _source(apiserver, store, audit):
    return KubernetesFaultSource(store, NodeWatch(apiserver.client("controller"), timeout_s=1), audit=audit)


@pytest.mark.parametrize("source, targets", [("gpu-0", ["gpu-1"]), ("gpu-0", ["gpu-1", "gpu-2"]),
                                             ("gpu-2", ["gpu-0", "gpu-1"])])
def test_a_fault_condition_on_a_node_its_key_does_not_name_is_refused_audited_and_never_stored(
        apiserver, tmp_path, source, targets):
    for i in range(3):
        apiserver.add_node(f"gpu-{i}")
    store, audit = Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db")
    agent = apiserver.client("agent")
    for target in targets:
        NodeFaultPublisher(agent, target).publish(f"{source}:s:1", XID79)
    watcher = _source(apiserver, store, audit)
    watcher.watch.watch_once(watcher.handle)
    assert store.pending() == []
    refused = [r for r in audit.records() if r.kind == "transport.refused"]
    assert sorted((r.node, r.payload["source"], r.payload["transport"]) for r in refused) == \
        [(t, source, "kubernetes") for t in sorted(targets)]
    # Seen again (a relist, another update of the node, a restarted controller): not audited again.
    apiserver.compact()
    watcher.watch.watch_once(watcher.handle)
    watcher.watch.watch_once(watcher.handle)
    restarted = _source(apiserver, Store(tmp_path / "state.db"), audit)
    restarted.watch.watch_once(restarted.handle)
    assert len([r for r in audit.records() if r.kind == "transport.refused"]) == len(targets)
    assert store.pending() == []
    # The node's own agent still reports its own fault.
    NodeFaultPublisher(agent, targets[0]).publish(f"{targets[0]}:s:7", XID79)
    restarted.watch.watch_once(restarted.handle)
    assert [e.node for _, e in store.pending()] == [targets[0]]


def test_faults_written_on_other_nodes_quarantine_nothing_and_leave_the_breaker_alone(apiserver, tmp_path):
    spec = parse_spec({"name": "k8s-test", "device_backend": "nvml", "scheduler": "kubernetes",
                       "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "H100", "gpus_per_node": 8}],
                       "policy": {"max_unavailable": 2, "breaker": {"max_quarantines": 1}},
                       "kubernetes": {"promote_spares": False}})
    for i in range(4):
        apiserver.add_node(f"gpu-{i}", labels={"aidc.dev/pool": "gpu"})
    store, audit = Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db")
    ctl = FailoverController(spec, store, audit, KubernetesScheduler(apiserver.client("ctl"), spec.kubernetes))
    agent = apiserver.client("agent")
    for target in ("gpu-1", "gpu-2", "gpu-3"):
        NodeFaultPublisher(agent, target).publish("gpu-0:s:1", XID79)
    watcher = _source(apiserver, store, audit)
    watcher.watch.watch_once(watcher.handle)
    assert ctl.run_once() == []
    assert [w for w in apiserver.writes("ctl") if "/nodes/" in w[1]] == []
    assert not ctl.gate.breaker().get("open") and ctl.gate.recent_quarantines() == []
