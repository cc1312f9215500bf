"""One GPU out on Kubernetes: the failover controller against the API-semantics server.

Specification: with DRA (kubernetes.gpu_allocation: dra) a fault local to one GPU creates a
DeviceTaintRule naming that GPU's device (driver, pool = node, device gpu-<index>), valid by
the API's schema; the node stays schedulable and its pods stay; release deletes the rule. With
the classic device plugin the node is quarantined instead, and the decision says why.
"""

from __future__ import annotations

from aidc.audit import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.gpu_quarantine import gpu_state
from aidc.failover.k8s_devices import rule_name
from aidc.failover.kubernetes import QUARANTINE_TAINT, KubernetesScheduler
from aidc.spec import parse_spec
from aidc.store import Store


def spec(gpu_allocation: str):
    return parse_spec({
        "name": "k8s-gpu", "device_backend": "nvml", "scheduler": "kubernetes",
        "node_pools": [{"name": "gpu", "count": 2, "gpu_model": "H100", "gpus_per_node": 8}],
        "policy": {"max_unavailable": 1},
        "kubernetes": {"eviction_timeout_s": 0, "promote_spares": False, "gpu_allocation": gpu_allocation},
    })


def dbe(node: str, gpu: int) -> FaultEvent:
    return FaultEvent(node, FaultKind.XID, Action.RESET_GPU, "XID 48: double-bit ECC error", "kmsg", gpu=gpu, xid=48)


def controller(apiserver, tmp_path, gpu_allocation: str) -> FailoverController:
    for name in ("gpu-a", "gpu-b"):
        apiserver.add_node(name, labels={"aidc.dev/pool": "gpu"})
    apiserver.add_pod("train", "trainer-a", "gpu-a")
    s = spec(gpu_allocation)
    return FailoverController(s, Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db"),
                              KubernetesScheduler(apiserver.client(), s.kubernetes))


def decide(ctl, event):
    with ctl.store.transaction():
        ctl.store.append(event)
    return ctl.run_once()


def test_a_gpu_local_fault_taints_that_one_device_and_the_node_keeps_working(apiserver, tmp_path):
    ctl = controller(apiserver, tmp_path, "dra")
    [d] = decide(ctl, dbe("gpu-a", 3))
    assert d.verdict == "quarantine_gpu"
    [rule] = apiserver.device_taint_rules.values()
    assert rule["metadata"]["name"] == rule_name("gpu-a", 3) == "aidc-gpu-a-gpu3"
    assert rule["spec"]["deviceSelector"] == {"driver": "gpu.nvidia.com", "pool": "gpu-a", "device": "gpu-3"}
    assert rule["spec"]["taint"] == {"key": QUARANTINE_TAINT, "value": "xid-48", "effect": "NoExecute"}
    assert apiserver.invalid == []  # the server validated it against the API's schema (strict)
    node = apiserver.node("gpu-a")
    assert not node["spec"].get("unschedulable") and not node["spec"].get("taints")
    assert ("train", "trainer-a") in apiserver.pods  # nothing evicted by aidc: the taint does that for the device
    assert gpu_state(ctl.store, "gpu-a", 3)["state"] == "quarantined"
    [action] = ctl.audit.records(kind="failover.action")
    assert action.payload["scope"] == "gpu" and action.payload["gpu"] == 3
    # A second fault on the same GPU changes nothing; the release deletes the rule.
    [again] = decide(ctl, dbe("gpu-a", 3))
    assert again.verdict == "already_quarantined" and len(apiserver.device_taint_rules) == 1
    assert ctl.gpus.release("gpu-a", 3, "GPU reset and re-tested", "user:alice")["released"] is True
    assert apiserver.device_taint_rules == {} and gpu_state(ctl.store, "gpu-a", 3) is None


def test_with_the_classic_device_plugin_the_node_is_quarantined_and_the_record_says_why(apiserver, tmp_path):
    ctl = controller(apiserver, tmp_path, "device_plugin")
    [d] = decide(ctl, dbe("gpu-a", 3))
    assert d.verdict == "quarantine" and apiserver.device_taint_rules == {}
    assert apiserver.node("gpu-a")["spec"]["unschedulable"] is True
    [decision] = [r for r in ctl.audit.records(kind="failover.decision") if r.payload["verdict"] == "quarantine"]
    assert decision.payload["scope"] == "node"
    assert "classic device plugin" in decision.payload["gpu_fallback"]
    assert "node is quarantined instead" in decision.payload["gpu_fallback"]

