"""The real actuators' adapters: metrics sources over HTTP, and the Ansible / burn-in integration points."""

from __future__ import annotations

import json
import sys
import threading
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aidc.burnin.suite import ALL as ALL_TESTS
from aidc.runbook.actuators import (AnsiblePlaybookRunner, CheckFailed, HttpMetrics, StageBurninRunner,
                                    StepUnavailable, expectation_met)
from aidc.spec import load_stack

METRICS_PAGE = """# HELP aidc_gpu_lost 1 when the GPU has fallen off the bus
# TYPE aidc_gpu_lost gauge
aidc_gpu_lost{Hostname="gpu-1",gpu="0",pci_bus_id="00000000:18:00.0",UUID="GPU-1"} 1.0
aidc_gpu_lost{Hostname="gpu-1",gpu="1",pci_bus_id="00000000:28:00.0",UUID="GPU-2"} 0.0
"""


@pytest.fixture
def http_stub():
    """A loopback HTTP server answering fixed pages: {path-prefix: (status, body)}."""
    pages: dict[str, tuple[int, str]] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            for prefix, (status, body) in pages.items():
                if self.path.startswith(prefix):
                    data = body.encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
            self.send_response(404)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pages
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("expect, values, met", [
    ("empty", [], True), ("empty", [0.0], False), ("nonempty", [0.0], True), ("== 1", [0.0, 1.0], True),
    ("> 0.9", [0.5], False), ("< 0.8", [0.79], True), ("!= 0", [], False),
    ("quarantined", "quarantined", True), ("in_service", "quarantined", False),
])
def test_check_expectations(expect, values, met):
    assert expectation_met(expect, values) is met


def test_prometheus_check_reads_the_query_api(http_stub):
    url, pages = http_stub
    pages["/api/v1/query"] = (200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"Hostname": "gpu-1"}, "value": [1700000000, "1"]}]}}))
    assert HttpMetrics(url, None).prometheus('aidc_gpu_lost{Hostname="gpu-1"}', 5) == [1.0]


def test_prometheus_errors_are_check_failures_not_tracebacks(http_stub):
    url, pages = http_stub
    pages["/api/v1/query"] = (400, json.dumps({"status": "error", "error": "parse error"}))
    with pytest.raises(CheckFailed, match="failed"):
        HttpMetrics(url, None).prometheus("bad{", 5)
    with pytest.raises(StepUnavailable, match="--prometheus"):
        HttpMetrics(None, None).prometheus("up", 5)


def test_agent_check_reads_the_agent_metrics_page(http_stub):
    url, pages = http_stub
    pages["/metrics"] = (200, METRICS_PAGE)
    metrics = HttpMetrics(None, lambda node: f"{url}/metrics")
    assert metrics.agent("gpu-1", "aidc_gpu_lost", {}, 5) == [1.0, 0.0]
    assert metrics.agent("gpu-1", "aidc_gpu_lost", {"gpu": "1"}, 5) == [0.0]


def test_agent_check_on_an_unreachable_agent_fails_the_check():
    with pytest.raises(CheckFailed, match="unreachable"):
        HttpMetrics(None, lambda node: "http://127.0.0.1:9/metrics").agent("gpu-1", "up", {}, 1)


@dataclass
class FakePlaybookResult:
    ok: bool
    status: str = "successful"
    changed: int = 1

    def describe(self) -> str:
        return "gpu-1: ok=3 changed=1 failed=0"


def test_playbook_steps_run_through_the_ansible_wrapper_limited_to_the_node(monkeypatch, tmp_path):
    calls = []

    def run_playbook(playbook, *, inventory, extravars=None, limit=None, timeout_s=None):
        calls.append((playbook, inventory, extravars, limit, timeout_s))
        return FakePlaybookResult(ok=True)

    monkeypatch.setitem(sys.modules, "aidc.ansible", types.SimpleNamespace(run_playbook=run_playbook))
    res = AnsiblePlaybookRunner(tmp_path, "inv.sh").run("gpu-reset.yml", "gpu-1", {"gpu": "0"}, 90.5)
    assert res.ok and res.data == {"status": "successful", "changed": 1}
    assert calls == [(tmp_path / "gpu-reset.yml", "inv.sh", {"gpu": "0"}, "gpu-1", 90)]


def test_without_the_ansible_wrapper_a_playbook_step_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "aidc.ansible", None)  # import of it raises ImportError
    with pytest.raises(StepUnavailable, match="ansible-runner wrapper"):
        AnsiblePlaybookRunner(tmp_path, "inv").run("x.yml", "gpu-1", {}, 10)


@dataclass
class FakeNodeResult:
    passed: bool
    reasons: list = field(default_factory=list)


def test_burnin_steps_burn_in_only_the_node_through_the_stacks_launcher_against_its_baseline(monkeypatch, tmp_path):
    """A runbook burns in its one node through the launcher of the stack's scheduler (not the whole
    lab fleet, as before), and only where a stored baseline of its GPU model can judge it alone."""
    seen = []

    class Launcher:
        name = "lab"

        def run(self, spec, nodes, *, lab_dir, audit, progress, timeout_s, say, **kw):
            seen.append(([n.name for n in nodes], timeout_s, kw["tests"]))
            name = nodes[0].name
            verdict = {"gpu-1": FakeNodeResult(False, ["gemm 40% below the SIM baseline"])}.get(name,
                                                                                              FakeNodeResult(True))
            return types.SimpleNamespace(report=types.SimpleNamespace(nodes={name: verdict}), job_id=None)

    monkeypatch.setitem(sys.modules, "aidc.burnin.launch.lab", types.SimpleNamespace(LAUNCHER=Launcher()))
    runner = StageBurninRunner(load_stack("lab"), tmp_path)
    refused = runner.run("gpu-1", ["gemm"], 120)
    assert not refused.ok and "no stored burn-in baseline for GPU model SIM" in refused.detail and seen == []
    (tmp_path / "burnin-baselines.json").write_text(json.dumps(
        {"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"gemm_fp32_tflops": 1.0}}}}))
    bad = runner.run("gpu-1", ["gemm"], 120)
    assert not bad.ok and bad.data["reasons"] == ["gemm 40% below the SIM baseline"] and bad.data["tests"] == ["gemm"]
    assert runner.run("gpu-2", [], 120).ok
    # The runbook's tests reach the launcher (none listed: the launcher runs them all).
    assert seen == [(["gpu-1"], 120, ["gemm"]), (["gpu-2"], 120, None)]


def test_a_burnin_whose_certificate_was_not_judged_against_the_baseline_does_not_recertify(monkeypatch, tmp_path):
    """Fail closed: a launcher that judged the lone node without the stored baseline (only floors)
    signed a pass that proves nothing about its speed; the step does not pass on it."""
    from aidc.audit.log import AuditLog

    audit = AuditLog(tmp_path / "audit.db")

    class Launcher:
        name = "lab"

        def __init__(self, baseline_used, tests=ALL_TESTS):
            self.baseline_used, self.tests = baseline_used, list(tests)

        def run(self, spec, nodes, *, lab_dir, audit, progress, timeout_s, say, **kw):
            name = nodes[0].name
            audit.append("burnin.certificate", "passed burn-in", actor="t", node=name,
                         payload={"verdict": "pass", "baseline": self.baseline_used, "tests": self.tests})
            return types.SimpleNamespace(report=types.SimpleNamespace(nodes={name: FakeNodeResult(True)}), job_id=None)

    (tmp_path / "burnin-baselines.json").write_text(json.dumps(
        {"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"gemm_fp32_tflops": 1.0}}}}))
    runner = StageBurninRunner(load_stack("lab"), tmp_path, audit)
    monkeypatch.setitem(sys.modules, "aidc.burnin.launch.lab", types.SimpleNamespace(LAUNCHER=Launcher({})))
    unjudged = runner.run("gpu-1", [], 120)
    assert not unjudged.ok and unjudged.data["verdict"] == "fail"
    assert unjudged.data["reasons"] == ["the lab launcher did not judge gpu-1 against the stored SIM baseline"]
    monkeypatch.setitem(sys.modules, "aidc.burnin.launch.lab",
                        types.SimpleNamespace(LAUNCHER=Launcher({"gemm_fp32_tflops": 1.0})))
    judged = runner.run("gpu-1", [], 120)
    assert judged.ok and judged.data["certificate_seq"] == audit.records(kind="burnin.certificate")[-1].seq
    # A pass of other tests than the runbook's is no recertification either.
    monkeypatch.setitem(sys.modules, "aidc.burnin.launch.lab",
                        types.SimpleNamespace(LAUNCHER=Launcher({"gemm_fp32_tflops": 1.0}, ["memcpy"])))
    other = runner.run("gpu-1", ["gemm", "memcpy"], 120)
    assert not other.ok
    assert other.data["reasons"] == ["the certificate of gpu-1 does not name the tests the runbook asked for"]
