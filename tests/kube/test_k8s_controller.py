"""The failover controller on Kubernetes: two replicas, one leader, the blast radius from the cluster."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from aidc.audit import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.k8s_controller import run_on_kubernetes
from aidc.failover.kubernetes import QUARANTINE_TAINT, KubernetesScheduler
from aidc.health.k8s_publisher import NodeFaultPublisher
from aidc.spec import parse_spec
from aidc.store import Store


def k8s_spec(max_unavailable=3, count=12):
    return parse_spec({
        "name": "k8s-test", "device_backend": "nvml", "scheduler": "kubernetes",
        "node_pools": [{"name": "gpu", "count": count, "gpu_model": "H100", "gpus_per_node": 8}],
        "policy": {"max_unavailable": max_unavailable},
        "kubernetes": {"lease_duration_s": 5, "renew_deadline_s": 3, "retry_period_s": 0.2,
                       "eviction_timeout_s": 1, "promote_spares": False},
    })


def xid79(node):
    return FaultEvent(node=node, kind=FaultKind.XID, action=Action.REBOOT_NODE,
                      message="XID 79: GPU has fallen off the bus", source="kmsg", gpu=0, xid=79)


def replica(apiserver, spec, tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    scheduler = KubernetesScheduler(apiserver.client(name), spec.kubernetes)
    ctl = FailoverController(spec, Store(d / "state.db"), AuditLog(d / "audit.db"), scheduler, actor=name)
    return ctl


def quarantined(apiserver):
    return sorted(n for n, o in apiserver.nodes.items()
                  if any(t["key"] == QUARANTINE_TAINT for t in o["spec"].get("taints", [])))


def wait_for(cond, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_two_replicas_and_a_burst_of_ten_faults_quarantine_within_the_blast_radius_once(apiserver, tmp_path):
    spec = k8s_spec(max_unavailable=3)
    for i in range(12):
        apiserver.add_node(f"gpu-{i}", labels={"aidc.dev/pool": "gpu"})
    replicas = [replica(apiserver, spec, tmp_path, n) for n in ("ctl-a", "ctl-b")]
    stop = threading.Event()
    threads = [threading.Thread(target=run_on_kubernetes, args=(ctl, stop, 0.02),
                                kwargs={"api_client": apiserver.client(ctl.actor), "identity": ctl.actor,
                                        "watch_timeout_s": 1}, daemon=True) for ctl in replicas]
    for t in threads:
        t.start()
    for i in range(10):
        NodeFaultPublisher(apiserver.client("agent"), f"gpu-{i}").publish(f"gpu-{i}:s:1", xid79(f"gpu-{i}"))
    # Every event decided: quarantined, or refused for capacity and kept pending until it returns.
    leader_done = lambda: any(len(ctl.store.events()) == 10 and all(o for _, _, o in ctl.store.events())  # noqa: E731
                              for ctl in replicas)
    assert wait_for(leader_done)
    stop.set()
    for t in threads:
        t.join(15)
    assert len(quarantined(apiserver)) == 3                      # never beyond max_unavailable
    acted = [ctl for ctl in replicas if apiserver.writes(ctl.actor) and any(
        "/api/v1/nodes/" in w[1] for w in apiserver.writes(ctl.actor))]
    assert len(acted) == 1                                       # the non-leader never patched a node
    leader = acted[0]
    actions = Counter(r.node for r in leader.audit.records() if r.kind == "failover.action")
    assert sorted(actions) == quarantined(apiserver) and set(actions.values()) == {1}
    outcomes = Counter(o for _, _, o in leader.store.events())
    assert outcomes == {"quarantine": 3, "refused_blast_radius": 7}
    assert len(leader.store.pending()) == 7                      # refused, kept until capacity returns
    assert apiserver.invalid == []


@pytest.mark.slow
def test_an_api_server_failing_leaves_the_event_pending_retries_it_and_audits_why(apiserver, tmp_path):
    spec = k8s_spec()
    apiserver.add_node("gpu-0", labels={"aidc.dev/pool": "gpu"})
    ctl = replica(apiserver, spec, tmp_path, "ctl")
    stop = threading.Event()
    t = threading.Thread(target=run_on_kubernetes, args=(ctl, stop, 0.02),
                         kwargs={"api_client": apiserver.client("ctl"), "identity": "ctl", "watch_timeout_s": 1},
                         daemon=True)
    t.start()
    assert wait_for(lambda: ctl.scheduler.lease.is_leader() if hasattr(ctl.scheduler, "lease") else False)
    real_patch = ctl.scheduler.backend.core.patch_node
    failing = {"left": 4}

    def flaky_patch(*a, **kw):
        if failing["left"]:
            failing["left"] -= 1
            from kubernetes.client import ApiException
            raise ApiException(status=503, reason="Service Unavailable")
        return real_patch(*a, **kw)

    ctl.scheduler.backend.core.patch_node = flaky_patch
    NodeFaultPublisher(apiserver.client("agent"), "gpu-0").publish("gpu-0:s:1", xid79("gpu-0"))
    assert wait_for(lambda: quarantined(apiserver) == ["gpu-0"])
    assert wait_for(lambda: not ctl.store.pending())
    stop.set()
    t.join(15)
    kinds = [r.kind for r in ctl.audit.records()]
    assert kinds.count("failover.error") == 1 and kinds.count("failover.action") == 1
    assert "503" in next(r.reason for r in ctl.audit.records() if r.kind == "failover.error")
