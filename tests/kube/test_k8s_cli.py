"""`aidc failover run` with a Kubernetes stack, as an operator runs it outside the cluster
(a kubeconfig), against the test API server: agents' fault conditions in, a quarantine out."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import yaml

from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.kubernetes import QUARANTINE_TAINT
from aidc.health.k8s_publisher import NodeFaultPublisher


def kubeconfig(path, url):
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
    return path


def k8s_stack(tmp_path, url, **policy):
    stack = tmp_path / "Pulumi.k8s-test.yaml"
    stack.write_text(yaml.safe_dump({"config": {"aidc:cluster": {
        "name": "k8s-test", "device_backend": "nvml", "scheduler": "kubernetes",
        "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "H100", "gpus_per_node": 8}],
        "policy": {"max_unavailable": 1, **policy},
        "kubernetes": {"kubeconfig": str(kubeconfig(tmp_path / "kubeconfig", url)), "lease_duration_s": 5,
                       "renew_deadline_s": 3, "retry_period_s": 0.2, "eviction_timeout_s": 1}}}}))
    return stack


@pytest.mark.slow
def test_failover_run_with_a_kubernetes_stack_quarantines_through_the_api(apiserver, tmp_path):
    for i in range(4):
        apiserver.add_node(f"gpu-{i}", labels={"aidc.dev/pool": "gpu"})
    stack = k8s_stack(tmp_path, apiserver.url)
    proc = subprocess.Popen([sys.executable, "-m", "aidc", "failover", "run", "--stack", str(stack),
                             "--lab-dir", str(tmp_path / "state")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        NodeFaultPublisher(apiserver.client("agent"), "gpu-2").publish("gpu-2:s:1", FaultEvent(
            node="gpu-2", kind=FaultKind.XID, action=Action.REBOOT_NODE, message="XID 79", source="kmsg",
            gpu=0, xid=79))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            node = apiserver.node("gpu-2")
            if any(t["key"] == QUARANTINE_TAINT for t in node["spec"].get("taints", [])):
                break
            time.sleep(0.1)
        node = apiserver.node("gpu-2")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert node["spec"]["unschedulable"] is True, err
    lease = apiserver.leases[("aidc-system", "aidc-failover-controller")]
    assert lease["spec"].get("holderIdentity") in (None, "")     # a clean stop hands the lease back
    assert apiserver.invalid == []


def test_a_kubernetes_stack_without_credentials_is_one_clear_error(aidc_cli, tmp_path):
    stack = k8s_stack(tmp_path, "http://127.0.0.1:9")
    (tmp_path / "kubeconfig").unlink()
    r = aidc_cli("failover", "run", "--stack", str(stack), "--lab-dir", str(tmp_path / "state"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no Kubernetes credentials" in r.stderr
