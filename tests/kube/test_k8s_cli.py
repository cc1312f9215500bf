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
from aidc.installation import record
from aidc.spec import load_stack


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
    assert not (tmp_path / "state").exists()   # nothing created by a command that could not start


DRAIN_AND_BACK = """\
name: drain-and-back
title: Take a node out and give it back
summary: A test runbook with the two scheduler steps.
trigger:
  alerts:
    - alertname: AidcTestDrain
guards:
  - guard: node_known
  - guard: blast_radius
steps:
  - id: out
    kind: quarantine
    reason: "test drain of ${node}"
  - id: back
    kind: release
    reason: "test over"
"""


@pytest.mark.slow
def test_runbook_run_with_a_kubernetes_stack_cordons_and_releases_through_the_api(apiserver, tmp_path, aidc_cli):
    for i in range(4):
        apiserver.add_node(f"gpu-{i}", labels={"aidc.dev/pool": "gpu"})
    apiserver.add_node("login-0")   # not one of aidc's nodes
    stack = k8s_stack(tmp_path, apiserver.url, runbook_auto_approve=["quarantine", "release"])
    books = tmp_path / "runbooks"
    books.mkdir()
    (books / "drain-and-back.yaml").write_text(DRAIN_AND_BACK)
    site = tmp_path / "site"
    site.mkdir()
    record(site, load_stack(str(stack)), str(stack))  # the installation a live run takes its roles from
    common = ["--stack", str(stack), "--runbooks", str(books), "--state-db", str(tmp_path / "rb.db"),
              "--audit-db", str(tmp_path / "audit.db"), "--lab-dir", str(site), "--json"]
    r = aidc_cli("runbook", "run", "drain-and-back", "--node", "gpu-3", *common)
    assert r.returncode == 0, r.stderr
    patches = [w for w in apiserver.writes() if w[0] == "PATCH" and w[1] == "/api/v1/nodes/gpu-3"]
    assert len(patches) >= 2                      # cordon + taint, then their undoing
    node = apiserver.node("gpu-3")
    assert not node["spec"].get("unschedulable") and not node["spec"].get("taints")
    r = aidc_cli("runbook", "run", "drain-and-back", "--node", "login-0", *common)
    assert r.returncode != 0 and "login-0' is not a node of" in r.stderr
    assert not apiserver.node("login-0")["spec"].get("unschedulable")


@pytest.mark.slow
def test_the_agent_reports_a_fault_as_a_node_condition_and_an_event_and_keeps_it_while_the_api_is_down(
        apiserver, tmp_path):
    from aidc.device import sim
    from aidc.failover.k8s_faults import fault_from_condition

    apiserver.add_node("gpu-1", labels={"aidc.dev/pool": "gpu"})
    node_dir = sim.create_node(tmp_path / "gpu-1", "gpu-1", gpus=2)
    env = {**__import__("os").environ, "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", apiserver.url))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    apiserver.fail_next(503, 3)   # the API server is away for the first tries
    proc = subprocess.Popen([sys.executable, "-m", "aidc", "agent", "run", "--node", "gpu-1", "--backend", "sim",
                             "--node-dir", str(node_dir), "--store", str(tmp_path / "store.db"),
                             "--audit-db", str(tmp_path / "audit.db"), "--port", "0", "--poll-interval", "0.05",
                             "--kubernetes", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        time.sleep(1)
        sim.inject(node_dir, "xid", gpu=0, xid=79)
        deadline = time.monotonic() + 60
        found = None
        while time.monotonic() < deadline and proc.poll() is None:
            conds = apiserver.node("gpu-1")["status"]["conditions"]
            found = [f for f in (fault_from_condition("gpu-1", c) for c in conds) if f]
            if found and "Xid79" in [e["reason"] for e in apiserver.events]:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # XID 79 is also a lost GPU (a device condition): the node condition holds the latest of
    # the two faults, and every fault has its own Event.
    (key, event), = found
    assert key.startswith("gpu-1:") and event.node == "gpu-1"
    xid79 = [e for e in apiserver.events if e["reason"] == "Xid79"]
    assert xid79 and xid79[0]["involvedObject"]["name"] == "gpu-1"
    assert __import__("json").loads(out)["events_forwarded"] >= 1
    assert apiserver.invalid == []


@pytest.mark.slow
def test_runbook_serve_with_a_kubernetes_stack_drains_through_the_api_on_an_alert(apiserver, tmp_path):
    from tests.runbook.serve_proc import ServeProcess, wait_until

    for i in range(4):
        apiserver.add_node(f"gpu-{i}", labels={"aidc.dev/pool": "gpu"})
    stack = k8s_stack(tmp_path, apiserver.url, runbook_auto_approve=["quarantine", "release"])
    books = tmp_path / "runbooks"
    books.mkdir()
    (books / "drain-and-back.yaml").write_text(DRAIN_AND_BACK)
    serve = ServeProcess(tmp_path, "s3cret", ["--stack", str(stack), "--runbooks", str(books),
                                              "--state-dir", str(tmp_path), "--state-db", str(tmp_path / "rb.db"),
                                              "--audit-db", str(tmp_path / "audit.db")]).start()
    try:
        serve.post({"version": "4", "status": "firing", "receiver": "aidc", "groupKey": "{}:{}",
                    "truncatedAlerts": 0, "alerts": [{
                        "status": "firing", "labels": {"alertname": "AidcTestDrain", "Hostname": "gpu-1"},
                        "annotations": {}, "startsAt": "2026-01-01T00:00:00Z", "fingerprint": "fp-k8s"}]})
        node_patches = lambda: [w for w in apiserver.writes() if w[:2] == ("PATCH", "/api/v1/nodes/gpu-1")]  # noqa: E731
        wait_until(lambda: len(node_patches()) >= 2, 60, "gpu-1 cordoned and released through the API")
        wait_until(lambda: not apiserver.node("gpu-1")["spec"].get("unschedulable"), 30, "gpu-1 back in service")
    finally:
        serve.stop()
    assert apiserver.invalid == []
    assert "Traceback" not in serve.log.read_text()
    assert not apiserver.node("gpu-1")["spec"].get("taints")
