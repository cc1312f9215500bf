"""The Kubernetes backend, with the official client against an API server with the API's semantics."""

from __future__ import annotations

import json

import pytest

from aidc.failover.kubernetes import (CONDITION, PROMOTED_FOR, QUARANTINE_TAINT, RECORD, SPARE_TAINT,
                                      KubernetesError, KubernetesScheduler, ReleaseRefused)
from aidc.failover.scheduler import SchedulerBackend
from aidc.spec import Kubernetes

SPARE = [{"key": SPARE_TAINT, "value": "true", "effect": "NoSchedule"}]


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def sleep(self, s):
        self.now += s

    def clock(self):
        return self.now


@pytest.fixture
def cluster(apiserver):
    for i in range(3):
        apiserver.add_node(f"gpu-{i}", labels={"aidc.dev/pool": "gpu"})
    apiserver.add_node("gpu-spare-0", taints=SPARE)
    apiserver.add_pod("train", "trainer-1", "gpu-1")
    apiserver.add_pod("gpu-operator", "dcgm-exporter-x", "gpu-1", owner_kind="DaemonSet")
    return apiserver


def scheduler(apiserver, **settings) -> tuple[KubernetesScheduler, FakeTime]:
    t = FakeTime()
    return KubernetesScheduler(apiserver.client(), Kubernetes(**settings), sleep=t.sleep, clock=t.clock), t


def taints(node: dict) -> dict:
    return {t["key"]: t for t in node["spec"].get("taints", [])}


def condition(node: dict) -> dict | None:
    return next((c for c in node["status"]["conditions"] if c["type"] == CONDITION), None)


def test_it_is_a_scheduler_backend(cluster):
    assert isinstance(scheduler(cluster)[0], SchedulerBackend)


def test_quarantine_cordons_taints_sets_the_condition_evicts_the_workload_and_promotes_a_spare(cluster):
    k8s, _ = scheduler(cluster)
    assert k8s.quarantine("gpu-1", "XID 79 on gpu 0 asks for reboot_node", event="17") is None
    node = cluster.node("gpu-1")
    assert node["spec"]["unschedulable"] is True
    assert taints(node)[QUARANTINE_TAINT] == {"key": QUARANTINE_TAINT, "value": "xid-79", "effect": "NoSchedule"}
    cond = condition(node)
    assert cond["status"] == "False" and cond["reason"] == "Xid79" and "XID 79" in cond["message"]
    record = json.loads(node["metadata"]["annotations"][RECORD])
    assert record["cordoned"] is True and record["event"] == "17"
    assert ("train", "trainer-1") not in cluster.pods                   # evicted
    assert ("gpu-operator", "dcgm-exporter-x") in cluster.pods          # DaemonSet pods stay
    spare = cluster.node("gpu-spare-0")
    assert SPARE_TAINT not in taints(spare) and spare["metadata"]["annotations"][PROMOTED_FOR] == "gpu-1"
    assert k8s.state("gpu-1") == "quarantined" and k8s.state("gpu-0") == "in_service"
    assert cluster.invalid == []


def test_a_repeated_quarantine_changes_nothing(cluster):
    k8s, _ = scheduler(cluster)
    k8s.quarantine("gpu-1", "XID 79")
    patches_before = len([r for r in cluster.writes() if r[0] == "PATCH" and r[1] == "/api/v1/nodes/gpu-1"])
    k8s.quarantine("gpu-1", "XID 79")
    patches_after = len([r for r in cluster.writes() if r[0] == "PATCH" and r[1] == "/api/v1/nodes/gpu-1"])
    assert patches_after == patches_before   # the node spec is not patched again
    assert len(taints(cluster.node("gpu-1"))) == 1
    assert sum(1 for n in ("gpu-0", "gpu-2", "gpu-spare-0")
               if cluster.node(n)["metadata"].get("annotations", {}).get(PROMOTED_FOR)) == 1


def test_a_disruption_budget_refusal_is_retried_with_backoff_then_reported(cluster):
    cluster.add_pod("train", "trainer-0", "gpu-0", pdb_protected=True)
    k8s, t = scheduler(cluster, eviction_timeout_s=10)
    warning = k8s.quarantine("gpu-0", "XID 48")
    assert "train/trainer-0" in warning and "disruption budget" in warning
    evictions = [r for r in cluster.requests if r[1].endswith("/pods/trainer-0/eviction")]
    assert len(evictions) >= 3 and t.now <= 10
    assert cluster.node("gpu-0")["spec"]["unschedulable"] is True  # out of service either way


def test_an_operators_cordon_is_never_undone(cluster):
    cluster.set_node("gpu-2", lambda n: n["spec"].update(unschedulable=True))
    k8s, _ = scheduler(cluster)
    with pytest.raises(ReleaseRefused) as refused:
        k8s.release("gpu-2", "operator's own cordon")
    assert refused.value.decision.verdict == "operator_cordon"
    assert cluster.node("gpu-2")["spec"]["unschedulable"] is True
    k8s.quarantine("gpu-2", "XID 79")
    decision = k8s.release("gpu-2", "GPU reseated")
    assert decision.verdict == "released"
    node = cluster.node("gpu-2")
    assert node["spec"]["unschedulable"] is True and QUARANTINE_TAINT not in taints(node)
    assert RECORD not in node["metadata"].get("annotations", {})


def test_release_undoes_what_aidc_did_and_puts_the_spare_taint_back(cluster):
    k8s, _ = scheduler(cluster)
    k8s.quarantine("gpu-1", "XID 79")
    decision = k8s.release("gpu-1", "GPU replaced")
    assert decision.verdict == "released" and decision.restored_spares == ["gpu-spare-0"]
    node = cluster.node("gpu-1")
    assert not node["spec"].get("unschedulable") and QUARANTINE_TAINT not in taints(node)
    assert condition(node)["status"] == "True"
    spare = cluster.node("gpu-spare-0")
    assert SPARE_TAINT in taints(spare) and PROMOTED_FOR not in spare["metadata"].get("annotations", {})
    assert cluster.invalid == []


def test_a_conflicting_change_is_reread_and_kept_not_overwritten(cluster, monkeypatch):
    k8s, _ = scheduler(cluster)
    real_read = k8s.core.read_node
    raced = []

    def read_then_someone_labels(name, **kw):
        obj = real_read(name, **kw)
        if name == "gpu-0" and not raced:  # between our read and our patch, an operator adds a taint
            raced.append(1)
            cluster.set_node("gpu-0", lambda n: n["spec"].setdefault("taints", []).append(
                {"key": "example.com/maintenance", "value": "bios", "effect": "NoSchedule"}))
        return obj

    monkeypatch.setattr(k8s.core, "read_node", read_then_someone_labels)
    k8s.quarantine("gpu-0", "XID 79")
    assert set(taints(cluster.node("gpu-0"))) == {"example.com/maintenance", QUARANTINE_TAINT}


def test_a_node_deleted_while_quarantining_is_reported_not_an_error(cluster):
    k8s, _ = scheduler(cluster)
    cluster.delete_node("gpu-0")
    assert "no longer exists" in k8s.quarantine("gpu-0", "XID 79")
    with pytest.raises(ReleaseRefused) as refused:
        k8s.release("gpu-0", "x")
    assert refused.value.decision.verdict == "node_gone"


def test_only_a_node_carrying_the_spare_taint_is_promoted(apiserver):
    apiserver.add_node("gpu-0")
    apiserver.add_node("gpu-1")  # a node without the spare taint is not a spare
    k8s, _ = scheduler(apiserver)
    assert k8s.quarantine("gpu-0", "XID 79") == "no healthy spare to promote"
    assert PROMOTED_FOR not in apiserver.node("gpu-1")["metadata"].get("annotations", {})


def test_an_unready_spare_is_not_promoted(apiserver):
    apiserver.add_node("gpu-0")
    apiserver.add_node("gpu-spare-0", taints=SPARE, ready=False)
    apiserver.add_node("gpu-spare-1", taints=SPARE)
    k8s, _ = scheduler(apiserver)
    k8s.quarantine("gpu-0", "XID 79")
    assert apiserver.node("gpu-spare-1")["metadata"]["annotations"][PROMOTED_FOR] == "gpu-0"
    assert SPARE_TAINT in taints(apiserver.node("gpu-spare-0"))


def test_out_of_service_comes_from_the_cluster_quarantined_and_not_ready_nodes(cluster):
    cluster.add_node("gpu-9", labels={"aidc.dev/pool": "gpu"}, ready=False)
    cluster.add_node("cpu-0", ready=False)   # not a node of aidc's pools: not counted
    k8s, _ = scheduler(cluster)
    k8s.quarantine("gpu-1", "XID 79")
    assert k8s.out_of_service() == {"gpu-1": "quarantined by aidc", "gpu-9": "not Ready"}
    other = KubernetesScheduler(cluster.client(), Kubernetes(), count_down_nodes=False)
    assert other.out_of_service() == {"gpu-1": "quarantined by aidc"}


def test_an_api_server_error_is_a_clear_error_and_changes_nothing(cluster):
    k8s, _ = scheduler(cluster)
    cluster.fail_next(503)
    with pytest.raises(KubernetesError, match="503"):
        k8s.quarantine("gpu-1", "XID 79")
    assert not cluster.node("gpu-1")["spec"].get("unschedulable")


@pytest.mark.parametrize("name", ["gpu-1; rm -rf /", "GPU-1", "a" * 300, "gpu-1\n", "", "../gpu-1"])
def test_a_name_that_is_not_a_node_name_never_reaches_the_api(cluster, name):
    k8s, _ = scheduler(cluster)
    with pytest.raises(KubernetesError, match="not a Kubernetes node name"):
        k8s.quarantine(name, "XID 79")
    assert cluster.writes() == []


def test_an_unreachable_api_server_is_a_clear_error(apiserver):
    from kubernetes import client

    config = client.Configuration()
    config.host = "http://127.0.0.1:9"   # nothing listens on the discard port
    config.retries = 0
    k8s = KubernetesScheduler(client.ApiClient(config), Kubernetes())
    with pytest.raises(KubernetesError, match="API server unreachable"):
        k8s.quarantine("gpu-1", "XID 79")
    with pytest.raises(KubernetesError, match="API server unreachable"):
        k8s.out_of_service()
