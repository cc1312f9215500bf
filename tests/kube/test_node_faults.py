"""Faults on Kubernetes: agents publish node conditions and Events; the controller's watch turns
each into one FaultEvent in its store, across repeats, relists (410 Gone) and restarts."""

from __future__ import annotations

import threading

from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.k8s_faults import KubernetesFaultSource, NodeWatch, fault_condition, fault_from_condition
from aidc.failover.kubernetes import KubernetesScheduler
from aidc.health.k8s_publisher import NodeFaultPublisher
from aidc.spec import Kubernetes
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
