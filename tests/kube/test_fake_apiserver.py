"""The test API server keeps the semantics aidc's Kubernetes code relies on (the official client)."""

from __future__ import annotations

import pytest
from kubernetes import client, watch


@pytest.fixture
def v1(apiserver):
    apiserver.add_node("gpu-0", labels={"aidc.dev/pool": "gpu"})
    return client.CoreV1Api(apiserver.client())


def test_a_patch_naming_a_stale_resource_version_is_a_conflict(v1):
    rv = v1.read_node("gpu-0").metadata.resource_version
    v1.patch_node("gpu-0", {"metadata": {"resourceVersion": rv}, "spec": {"unschedulable": True}})
    with pytest.raises(client.ApiException) as err:
        v1.patch_node("gpu-0", {"metadata": {"resourceVersion": rv}, "spec": {"unschedulable": False}})
    assert err.value.status == 409
    assert v1.read_node("gpu-0").spec.unschedulable is True


def test_status_conditions_merge_by_type_and_the_status_subresource_leaves_spec_alone(v1):
    cond = {"type": "AidcGpuHealthy", "status": "False", "reason": "Xid79", "message": "fell off the bus",
            "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    node = v1.patch_node_status("gpu-0", {"status": {"conditions": [cond]}, "spec": {"unschedulable": True}})
    assert [c.type for c in node.status.conditions] == ["Ready", "AidcGpuHealthy"]
    assert not node.spec.unschedulable


def test_an_invalid_object_is_refused_with_422(apiserver, v1):
    with pytest.raises(client.ApiException) as err:
        v1.patch_node("gpu-0", {"spec": {"taints": [{"key": "aidc.dev/quarantine", "value": "no-effect"}]}})
    assert err.value.status == 422 and apiserver.invalid


def test_eviction_under_a_spent_disruption_budget_is_429_and_the_pod_stays(apiserver, v1):
    apiserver.add_pod("train", "w0", "gpu-0", pdb_protected=True)
    body = client.V1Eviction(metadata=client.V1ObjectMeta(name="w0", namespace="train"))
    with pytest.raises(client.ApiException) as err:
        v1.create_namespaced_pod_eviction("w0", "train", body)
    assert err.value.status == 429
    assert len(v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=gpu-0").items) == 1


def test_watch_resumes_from_a_version_and_a_compacted_version_is_410(apiserver, v1):
    rv = v1.list_node().metadata.resource_version
    v1.patch_node("gpu-0", {"metadata": {"labels": {"x": "1"}}})
    seen = [(e["type"], e["object"].metadata.labels.get("x"))
            for e in watch.Watch().stream(v1.list_node, resource_version=rv, timeout_seconds=1)]
    assert seen == [("MODIFIED", "1")]
    apiserver.compact()
    with pytest.raises(client.ApiException) as err:
        list(watch.Watch().stream(v1.list_node, resource_version=rv, timeout_seconds=1))
    assert err.value.status == 410


def test_injected_failures_answer_the_next_requests(apiserver, v1):
    apiserver.fail_next(503)
    with pytest.raises(client.ApiException) as err:
        v1.list_node()
    assert err.value.status == 503
    assert v1.list_node().items


def test_a_field_belongs_to_the_manager_that_last_changed_it_and_a_no_op_write_moves_nothing(apiserver, v1):
    v1.patch_node("gpu-0", {"spec": {"unschedulable": True}}, field_manager="aidc")
    assert apiserver.field_owners("gpu-0", "spec", "unschedulable") == ["aidc"]
    v1.patch_node("gpu-0", {"spec": {"unschedulable": True}}, field_manager="kubectl-cordon")   # no change
    assert apiserver.field_owners("gpu-0", "spec", "unschedulable") == ["aidc"]
    operator = client.CoreV1Api(apiserver.client(user_agent="kubectl/v1.33.0 (linux/amd64)"))
    operator.patch_node("gpu-0", {"spec": {"unschedulable": False}})   # the manager from the User-Agent
    assert apiserver.field_owners("gpu-0", "spec", "unschedulable") == ["kubectl"]
    apiserver.set_node("gpu-0", lambda n: n["spec"].pop("unschedulable"), manager="someone")
    assert apiserver.field_owners("gpu-0", "spec", "unschedulable") == []
    assert apiserver.invalid == []
