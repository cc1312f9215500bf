"""On Kubernetes aidc undoes only what it can prove it did: a cordon is lifted only while the
field manager of `spec.unschedulable` is still aidc's (an operator's cordon after aidc's stays);
quarantined nodes are counted by aidc's own record, not a pool label an operator can remove; and
eviction skips what `kubectl drain` skips plus what keeps the cluster and aidc itself running."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client

from aidc.failover.kubernetes import FIELD_MANAGER, QUARANTINE_TAINT, RECORD, KubernetesScheduler
from aidc.spec import Kubernetes

POOL = {"aidc.dev/pool": "gpu"}


@pytest.fixture
def cluster(apiserver):
    for i in range(3):
        apiserver.add_node(f"gpu-{i}", labels=POOL)
    return apiserver


def scheduler(apiserver, **kw) -> KubernetesScheduler:
    return KubernetesScheduler(apiserver.client(), Kubernetes(promote_spares=False, eviction_timeout_s=0),
                               sleep=lambda s: None, **kw)


def kubectl(apiserver, manager: str):
    """An operator's kubectl, writing as `manager` (kubectl cordon uses kubectl-cordon)."""
    api = client.CoreV1Api(apiserver.client(user_agent="kubectl/v1.33.0"))
    return lambda name, patch: api.patch_node(name, patch, field_manager=manager)


def test_aidc_writes_as_its_own_field_manager(cluster):
    scheduler(cluster).quarantine("gpu-1", "XID 79")
    assert cluster.field_owners("gpu-1", "spec", "unschedulable") == [FIELD_MANAGER]


def test_an_operator_cordon_after_aidcs_is_kept_on_release(cluster):
    k8s = scheduler(cluster)
    k8s.quarantine("gpu-1", "XID 79")
    cordon = kubectl(cluster, "kubectl-cordon")
    cordon("gpu-1", {"spec": {"unschedulable": False}})   # the operator takes the node over:
    cordon("gpu-1", {"spec": {"unschedulable": True}})    # uncordon to test it, cordon again for RMA
    decision = k8s.release("gpu-1", "GPU replaced")
    assert decision.verdict == "released" and "cordon stays" in decision.detail
    node = cluster.node("gpu-1")
    assert node["spec"]["unschedulable"] is True
    assert QUARANTINE_TAINT not in {t["key"] for t in node["spec"].get("taints", [])}
    assert RECORD not in node["metadata"].get("annotations", {})


def test_a_record_aidc_did_not_write_never_lifts_a_cordon(cluster):
    # Someone copies aidc's record onto a node they cordoned: the words say "aidc cordoned it",
    # but the API server says who set the field.
    kubectl(cluster, "kubectl-cordon")("gpu-2", {"spec": {"unschedulable": True}})
    kubectl(cluster, "kubectl-annotate")("gpu-2", {"metadata": {"annotations": {RECORD: json.dumps(
        {"cordoned": True, "tainted": True, "reason": "XID 79", "event": "3"})}}})
    scheduler(cluster).release("gpu-2", "fault cleared")
    assert cluster.node("gpu-2")["spec"]["unschedulable"] is True


def test_aidcs_own_cordon_is_still_lifted(cluster):
    k8s = scheduler(cluster)
    k8s.quarantine("gpu-0", "XID 79")
    kubectl(cluster, "kubectl-label")("gpu-0", {"metadata": {"labels": {"rack": "r4"}}})  # unrelated change
    assert "cordon stays" not in k8s.release("gpu-0", "GPU replaced").detail
    assert not cluster.node("gpu-0")["spec"].get("unschedulable")


def test_a_quarantined_node_stays_counted_when_its_pool_label_is_removed(cluster):
    k8s = scheduler(cluster)
    k8s.quarantine("gpu-1", "XID 79")
    kubectl(cluster, "kubectl-label")("gpu-1", {"metadata": {"labels": {"aidc.dev/pool": None}}})
    assert k8s.out_of_service() == {"gpu-1": "quarantined by aidc"}


@pytest.mark.parametrize("pod, stays", [
    (dict(namespace="train", name="trainer"), False),
    (dict(namespace="train", name="high-but-not-critical", priority=1_000_000), False),
    (dict(namespace="train", name="node-critical", priority_class="system-node-critical"), True),
    (dict(namespace="train", name="cluster-critical", priority_class="system-cluster-critical"), True),
    (dict(namespace="train", name="critical-by-value", priority=2_000_000_000), True),
    (dict(namespace="kube-system", name="coredns-abc", owner_kind="ReplicaSet"), True),
    (dict(namespace="aidc-system", name="aidc-failover-controller-7d9f", owner_kind="ReplicaSet"), True),
    (dict(namespace="aidc-system", name="another-pod", owner_kind="ReplicaSet"), False),
    (dict(namespace="gpu-operator", name="dcgm-exporter", owner_kind="DaemonSet"), True),
    (dict(namespace="train", name="kube-apiserver-gpu-1", annotations={"kubernetes.io/config.mirror": "x"}), True),
])
def test_eviction_skips_what_keeps_the_node_the_cluster_and_aidc_running(cluster, pod, stays):
    cluster.add_pod(node="gpu-1", **pod)
    k8s = scheduler(cluster, own_pod=("aidc-system", "aidc-failover-controller-7d9f"))
    k8s.quarantine("gpu-1", "XID 79")
    assert ((pod["namespace"], pod["name"]) in cluster.pods) is stays
    assert cluster.invalid == []


def test_the_controllers_own_pod_comes_from_the_downward_api(cluster, monkeypatch):
    monkeypatch.setenv("POD_NAMESPACE", "aidc-system")
    monkeypatch.setenv("POD_NAME", "aidc-failover-controller-7d9f")
    cluster.add_pod("aidc-system", "aidc-failover-controller-7d9f", "gpu-1", owner_kind="ReplicaSet")
    scheduler(cluster).quarantine("gpu-1", "XID 79")
    assert ("aidc-system", "aidc-failover-controller-7d9f") in cluster.pods


def test_an_operator_cordon_landing_between_releases_read_and_its_patch_is_kept(cluster, monkeypatch):
    k8s = scheduler(cluster)
    k8s.quarantine("gpu-1", "XID 79")
    real_read, raced = k8s.core.read_node, []
    cordon = kubectl(cluster, "kubectl-cordon")

    def read_then_the_operator_recordons(name, **kw):
        obj = real_read(name, **kw)
        if not raced:   # after aidc's first read: its patch carries a stale resourceVersion
            raced.append(1)
            cordon(name, {"spec": {"unschedulable": False}})
            cordon(name, {"spec": {"unschedulable": True}})
        return obj

    monkeypatch.setattr(k8s.core, "read_node", read_then_the_operator_recordons)
    k8s.release("gpu-1", "GPU replaced")
    assert cluster.node("gpu-1")["spec"]["unschedulable"] is True
    assert cluster.field_owners("gpu-1", "spec", "unschedulable") == ["kubectl-cordon"]


def test_the_controller_refuses_past_the_blast_radius_after_a_pool_label_is_removed(cluster, tmp_path):
    from aidc.audit import AuditLog
    from aidc.events import Action, FaultEvent, FaultKind
    from aidc.failover.controller import FailoverController
    from aidc.spec import parse_spec
    from aidc.store import Store

    spec = parse_spec({"name": "k8s-test", "device_backend": "nvml", "scheduler": "kubernetes",
                       "node_pools": [{"name": "gpu", "count": 3, "gpu_model": "H100", "gpus_per_node": 8}],
                       "policy": {"max_unavailable": 1},
                       "kubernetes": {"eviction_timeout_s": 0, "promote_spares": False}})
    store = Store(tmp_path / "state.db")
    ctl = FailoverController(spec, store, AuditLog(tmp_path / "audit.db"), scheduler(cluster), actor="test")

    def fault(node):
        return store.append(FaultEvent(node, FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", gpu=0, xid=79))

    fault("gpu-1")
    assert [d.verdict for d in ctl.run_once()] == ["quarantine"]
    kubectl(cluster, "kubectl-label")("gpu-1", {"metadata": {"labels": {"aidc.dev/pool": None}}})
    fault("gpu-2")
    assert [d.verdict for d in ctl.run_once()] == ["refused_blast_radius"]
    assert not cluster.node("gpu-2")["spec"].get("unschedulable")
    store.close()


OPERATOR_STEPS = st.lists(st.sampled_from(["cordon", "uncordon", "label"]), max_size=4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cordoned_first=st.booleans(), steps=OPERATOR_STEPS)
def test_release_lifts_a_cordon_only_when_aidc_set_it_and_nobody_changed_it_since(apiserver, cordoned_first, steps):
    name = f"gpu-{len(apiserver.nodes)}"
    apiserver.add_node(name, labels=POOL, unschedulable=cordoned_first)
    k8s = scheduler(apiserver)
    k8s.quarantine(name, "XID 79")
    operator = kubectl(apiserver, "kubectl-cordon")
    touched = False   # did an operator's write change the field after aidc's quarantine?
    for step in steps:
        before = bool(apiserver.node(name)["spec"].get("unschedulable"))
        if step == "label":
            operator(name, {"metadata": {"labels": {"rack": f"r{len(steps)}"}}})
            continue
        operator(name, {"spec": {"unschedulable": step == "cordon"}})
        touched |= before != (step == "cordon")
    value = bool(apiserver.node(name)["spec"].get("unschedulable"))
    k8s.release(name, "fault cleared")
    aidcs = not cordoned_first and not touched
    assert bool(apiserver.node(name)["spec"].get("unschedulable")) == (value and not aidcs)
