"""End to end through REAL Prometheus and Alertmanager (Debian packages), on loopback.

1. Alertmanager alone: an alert pushed to it is delivered, with the bearer token, to
   `aidc runbook serve`; its repeats start nothing more.
2. The whole path: Prometheus scrapes lab agents (`aidc agent run`), a fault is injected,
   the rule fires, Alertmanager posts to the receiver, the runbook quarantines the node
   through the lab scheduler, and the audit log shows each step.
Every process started here is stopped, pass or fail.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aidc.audit.log import AuditLog
from aidc.device.sim import create_node, inject
from aidc.failover.scheduler import LabScheduler
from aidc.polling import stop_process_group
from aidc.runbook.promstack import PromStack, free_port, missing_binaries
from aidc.runbook.state import RunState
from certs import CA
from runbook_fakes import write_runbook
from serve_proc import ServeProcess, wait_until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "runbooks/alerts/aidc-alerts.yml"
NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]

needs_stack = pytest.mark.skipif(bool(missing_binaries()), reason=(
    f"{', '.join(missing_binaries())} not installed (Debian packages `prometheus`, `prometheus-alertmanager`; "
    "`make system-deps` installs them)"))
agent_available = importlib.util.find_spec("aidc.health.agent") is not None

DELIVERY = """
name: am-drill
title: Alertmanager delivery drill
summary: Quarantine the node named by the alert and notify.
trigger: {alerts: [{alertname: AidcDeliveryDrill}]}
steps:
  - {id: out, kind: quarantine, reason: "delivery drill"}
  - {id: tell, kind: notify, message: "${node} drilled"}
"""


def make_lab(tmp_path: Path) -> Path:
    for i, name in enumerate(NODES):
        create_node(tmp_path / "lab" / "nodes" / name, name, 2, i)
    return tmp_path / "lab"


@pytest.mark.slow
@needs_stack
def test_alertmanager_delivers_with_the_token_and_repeats_run_nothing_twice(tmp_path):
    lab = make_lab(tmp_path)
    rb_dir = tmp_path / "runbooks"
    rb_dir.mkdir()
    write_runbook(rb_dir, DELIVERY)
    serve = ServeProcess(tmp_path, "am-t0ken", ["--lab-dir", str(lab), "--state-db", str(tmp_path / "state.db"),
                                                "--audit-db", str(tmp_path / "audit.db"), "--runbooks", str(rb_dir)])
    stack = None
    state = RunState(tmp_path / "state.db")
    try:
        serve.start()
        stack = PromStack(tmp_path / "prom", {}, RULES, serve.url, tmp_path / "token", repeat_interval="1s").start()
        labels = {"alertname": "AidcDeliveryDrill", "Hostname": "gpu-1", "severity": "critical"}
        stack.push_alert(labels, {"runbook": "am-drill"})
        wait_until(lambda: state.runs() and state.runs()[0].status == "done", 30, "the run to finish")
        assert LabScheduler(lab).state("gpu-1") == "quarantined"
        # Alertmanager keeps repeating (repeat_interval 1s): every repeat is answered "duplicate".
        def deliveries() -> list[dict]:  # the requests the receiver logged (JSON lines)
            logged = [json.loads(line) for line in serve.log.read_text().splitlines() if line.startswith("{")]
            return [e for e in logged if e.get("method") == "POST" and e.get("path") == "/alerts"]

        wait_until(lambda: sum("duplicate:am-drill@gpu-1" in e["note"] for e in deliveries()) >= 2, 30,
                   "repeat notifications")
        # Every delivery carried the token: each one is a 200.
        statuses = [e["status"] for e in deliveries()]
        assert len(statuses) >= 3 and set(statuses) == {200}, statuses
        assert len(state.runs()) == 1
        with AuditLog(tmp_path / "audit.db") as audit:
            assert [r.payload["step"] for r in audit.records(kind="runbook.step")] == ["out", "tell"]
            trig = audit.records(kind="runbook.step")[0].payload["trigger"]
            assert trig["source"] == "alertmanager" and trig["fingerprint"]
    finally:
        if stack:
            stack.stop()
        serve.stop()
        state.close()


@pytest.mark.slow
@needs_stack
def test_alertmanager_delivers_over_mutual_tls_without_a_token(tmp_path):
    """Alertmanager's own TLS client (Go) against the receiver's mutual TLS: the handshake is the
    authentication, and the run's audited trigger names the verified client certificate."""
    lab = make_lab(tmp_path)
    rb_dir = tmp_path / "runbooks"
    rb_dir.mkdir()
    write_runbook(rb_dir, DELIVERY)
    ca = CA.create(tmp_path / "pki", "aidc-test-ca")
    server = ca.issue(tmp_path / "pki", "aidc-runbook", server=True)
    client = ca.issue(tmp_path / "pki", "alertmanager", server=False)
    serve = ServeProcess(tmp_path, None, ["--tls-cert", str(server.cert), "--tls-key", str(server.key),
                                          "--client-ca", str(ca.cert_file), "--lab-dir", str(lab),
                                          "--state-db", str(tmp_path / "state.db"),
                                          "--audit-db", str(tmp_path / "audit.db"), "--runbooks", str(rb_dir)])
    stack = None
    state = RunState(tmp_path / "state.db")
    try:
        serve.start()
        assert serve.url.startswith("https://")
        stack = PromStack(tmp_path / "prom", {}, RULES, serve.url, None, repeat_interval="1s",
                          webhook_tls={"ca_file": ca.cert_file, "cert_file": client.cert,
                                       "key_file": client.key}).start()
        stack.push_alert({"alertname": "AidcDeliveryDrill", "Hostname": "gpu-2", "severity": "critical"},
                         {"runbook": "am-drill"})
        wait_until(lambda: state.runs() and state.runs()[0].status == "done", 30, "the run to finish")
        assert LabScheduler(lab).state("gpu-2") == "quarantined"
        assert state.runs()[0].trigger["sender"]["client"] == "CN=alertmanager"
        with AuditLog(tmp_path / "audit.db") as audit:
            first = audit.records(kind="runbook.step")[0].payload["trigger"]
            assert first["sender"] == {"address": "127.0.0.1", "client": "CN=alertmanager",
                                       "identity": "cert:alertmanager", "identities": ["cert:alertmanager"]}
    finally:
        if stack:
            stack.stop()
        serve.stop()
        state.close()


@pytest.mark.slow
@needs_stack
@pytest.mark.skipif(not agent_available, reason="agent not yet available")
def test_injected_fault_fires_alert_and_runbook_quarantines_the_node(tmp_path):
    lab = make_lab(tmp_path)
    watched = ["gpu-0", "gpu-1"]  # two agents keep the test light on 2 cores
    ports = {n: free_port() for n in watched}
    agents: list[subprocess.Popen] = []
    stack = None
    serve = None
    state = RunState(tmp_path / "state.db")
    try:
        for node in watched:
            node_dir = lab / "nodes" / node
            log = open(tmp_path / f"agent-{node}.log", "ab")
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "aidc", "agent", "run", "--node", node, "--backend", "sim",
                 "--node-dir", str(node_dir), "--kernel-log", str(node_dir / "kern.log"),
                 "--store", str(tmp_path / f"store-{node}.db"), "--audit-db", str(tmp_path / f"agent-audit-{node}.db"),
                 "--port", str(ports[node])], stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        serve_args = ["--lab-dir", str(lab), "--state-db", str(tmp_path / "state.db"),
                      "--audit-db", str(tmp_path / "audit.db"), "--notify-file", str(tmp_path / "notify.jsonl")]
        stack = PromStack(tmp_path / "prom", ports, RULES, "", tmp_path / "token")
        # The receiver queries Prometheus in the runbook's check steps; Alertmanager posts to the receiver.
        serve = ServeProcess(tmp_path, "e2e-t0ken", [*serve_args, "--prometheus", stack.prometheus_url]).start()
        stack.webhook_url = serve.url
        stack.start()
        wait_until(lambda: stack.targets_up() == len(watched), 60, "Prometheus to scrape both agents", 0.5)

        inject(lab / "nodes" / "gpu-1", "xid", gpu=0, xid=79)

        wait_until(lambda: LabScheduler(lab).state("gpu-1") == "quarantined", 60, "the runbook's quarantine", 0.2)
        run = wait_until(lambda: next((r for r in state.runs() if r.status == "awaiting_approval"), None), 30,
                         "the run to reach its approval step")
        assert (run.runbook, run.node) == ("gpu-fallen-off-bus", "gpu-1")
        assert run.trigger["alertname"] == "AidcGpuFallenOffBus"
        assert LabScheduler(lab).state("gpu-0") == "in_service"
        with AuditLog(tmp_path / "audit.db") as audit:
            steps = [(r.payload["step"], r.payload["status"]) for r in audit.records(kind="runbook.step")]
            assert steps == [("confirm-gpu-lost", "done"), ("take-out-of-service", "done"), ("tell-on-call", "done")]
            assert audit.verify().ok
    finally:
        if stack:
            stack.stop()
        if serve:
            serve.stop()
        for proc in agents:
            stop_process_group(proc)
        state.close()
