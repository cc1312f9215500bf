"""The Grafana dashboard (dashboards/aidc.json): it is valid against Grafana's own published
dashboard schema (a pinned copy, tests/dashboards/schema/SOURCE.md), every query parses
(promtool), and every panel's query returns data from a real Prometheus scraping lab agents
(`aidc agent run --backend sim`) after a fault, except queries of metrics that other branches
are adding now (PENDING below)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import jsonschema
import pytest

from aidc.audit.log import AuditLog
from aidc.device.sim import create_node, inject
from aidc.events import Action, FaultEvent, FaultKind
from aidc.goodput import StepLog
from aidc.health.stragglers import STEP_TIMES_FILE
from aidc.polling import stop_process_group
from aidc.runbook.promstack import PromStack, _get, free_port, missing_binaries
from aidc.store import Store

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "dashboards" / "aidc.json").read_text())
SCHEMAS = Path(__file__).parent / "schema"
RULES = ROOT / "runbooks" / "alerts" / "aidc-alerts.yml"
NODES = ["gpu-0", "gpu-1"]

# Metrics the dashboard reads that nothing exports yet: none. A name here is a gap to close;
# its query must still parse and be accepted by Prometheus.
PENDING: dict[str, str] = {}
# What Grafana substitutes before a query reaches Prometheus: the node variable at "All" (its
# allValue) and a rate window of many 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$node": ".*"}
METRIC = re.compile(r"\b(aidc_[a-z_]+|DCGM_FI_[A-Z_]+)\b")


def panels(kind: str | None = None) -> list[dict]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row" and (kind is None or p["type"] == kind)]


def queries() -> list[tuple[str, str]]:
    """(panel title / refId, the PromQL Prometheus receives) for every target of every panel."""
    out = []
    for p in panels():
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((f"{p['title']} / {t['refId']}", expr))
    return out


def is_pending(expr: str) -> bool:
    return any(m in PENDING for m in METRIC.findall(expr))


def test_the_dashboard_validates_against_grafanas_dashboard_schema():
    schema = json.loads((SCHEMAS / "dashboard.jsonschema.json").read_text())
    errors = [f"{list(e.path)}: {e.message[:200]}" for e in jsonschema.Draft7Validator(schema).iter_errors(DASHBOARD)]
    assert errors == []
    # The schema is strict enough to catch a broken panel (so the check above can fail).
    broken = json.loads(json.dumps(DASHBOARD))
    broken["panels"][1]["gridPos"]["w"] = "wide"
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_every_target_is_a_valid_prometheus_query_of_the_chosen_data_source():
    schema = json.loads((SCHEMAS / "prometheus.jsonschema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for p in panels():
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert [e.message for e in validator.iter_errors(t)] == [], (p["title"], t["refId"])
            assert t["datasource"] == p["datasource"]


def test_panels_have_unique_ids_and_tile_the_24_column_grid_without_overlap():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def test_the_dashboard_covers_health_faults_quarantine_burnin_fabric_stragglers_and_goodput():
    read = {m for _, expr in queries() for m in METRIC.findall(expr)}
    assert {"aidc_agent_info", "aidc_gpu_lost", "DCGM_FI_DEV_GPU_TEMP",  # fleet health
            "aidc_xid_errors_total", "aidc_faults_total",  # faults and XIDs over time
            "aidc_node_quarantined", "aidc_failover_breaker_open",  # quarantine and the breaker
            "aidc_burnin_passed", "aidc_burnin_relative_perf",  # burn-in results
            "aidc_burnin_busbw_link_fraction",  # collective bandwidth against the link rate
            "aidc_train_step_seconds", "aidc_goodput_ettr"} <= read  # stragglers, goodput
    assert set(PENDING) <= read, "a pending metric the dashboard no longer reads: drop it from PENDING"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package `prometheus`)")
def test_promtool_parses_every_query(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"aidc:dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries())]}]}
    path = tmp_path / "queries.rules.json"  # YAML is a superset of JSON: promtool reads it
    path.write_text(json.dumps(rules))
    checked = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries())} rules found" in checked.stdout


def _certify(audit_db: Path, node: str) -> None:
    """A node's burn-in certificate, as aidc.burnin writes it (verdict and collective sweep)."""
    with AuditLog(audit_db) as audit:
        audit.append("burnin.certificate", "passed burn-in", actor="burnin", node=node, payload={
            "verdict": "pass", "reasons": [], "link_rate_gbps": 0.025, "collectives": {op: [
                {"bytes": 4 << 20, "algbw_gbps": 0.02, "busbw_gbps": f * 0.025, "link_fraction": f}]
                for op, f in (("all_reduce", 0.92), ("all_gather", 0.9), ("broadcast", 0.3))}})


def _training_job_reports(node_dirs: dict[str, Path], steps: int = 60) -> None:
    """Each rank's step-time report (aidc.lab.trainer.StepTimeReport, the job-side writer the
    agents follow): gpu-1 computes 30% slower than gpu-0."""
    from aidc.lab.trainer import StepTimeReport

    members = list(node_dirs)
    reports = [StepTimeReport(d / STEP_TIMES_FILE, node, rank, members) for rank, (node, d) in
               enumerate(node_dirs.items())]
    for step in range(1, steps + 1):
        for report in reports:
            report.record(step, [0.010, 0.013], [0.004, 0.001], 0.004 if report.rank == 0 else 0.001)


def _goodput_log(path: Path) -> None:
    log = StepLog(path, job="lab")
    log.allocation(t=0.0)
    log.start(resumed_from=0, t=0.5)
    for n in range(1, 11):
        log.step_done(n, n, n + 0.9)
    log.end(t=11.0)


def _escalating_faults(store_db: Path) -> None:
    """XID 31 twice on one GPU, a burst apart: the controller escalates restart_app to reset_gpu."""
    now = time.time()
    store = Store(store_db)
    try:
        for at in (now - 300, now):
            store.append(FaultEvent("gpu-0", FaultKind.XID, Action.RESTART_APP, "XID 31", "kmsg", gpu=0, xid=31,
                                    observed_at=at))
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_binaries()), reason="Prometheus and Alertmanager (Debian packages) not installed")
def test_every_panel_query_returns_data_from_prometheus_scraping_lab_agents(tmp_path):
    lab = tmp_path / "lab"
    ports = {node: free_port() for node in NODES}
    procs, stack = [], None
    node_dirs = {node: create_node(lab / "nodes" / node, node, 2, i, rails=2) for i, node in enumerate(NODES)}
    # gpu-1's rail 1 is down (the fabric's link state file): its InfiniBand port reads down.
    (node_dirs["gpu-1"] / "links.json").write_text(json.dumps(
        {"rails": {"1": {"up": False, "rate_fraction": 1.0, "loss_pct": 0.0}}}))
    _training_job_reports(node_dirs)
    stack_file = tmp_path / "Pulumi.dash.yaml"
    stack_file.write_text(STACK)
    _escalating_faults(lab / "state.db")
    _goodput_log(tmp_path / "goodput.jsonl")

    def start(name: str, *args: str) -> None:
        with open(tmp_path / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "aidc", *args], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    try:
        for node in NODES:
            _certify(tmp_path / f"audit-{node}.db", node)
            start(f"agent-{node}", "agent", "run", "--node", node, "--backend", "sim",
                  "--node-dir", str(node_dirs[node]), "--kernel-log", str(node_dirs[node] / "kern.log"),
                  "--store", str(tmp_path / f"store-{node}.db"), "--audit-db", str(tmp_path / f"audit-{node}.db"),
                  "--port", str(ports[node]))
        # The fleet-wide series: the failover controller's and the goodput exporter's.
        ports["failover-controller"] = free_port()
        start("controller", "failover", "run", "--stack", str(stack_file), "--lab-dir", str(lab), "--no-dry-run",
              "--poll", "0.05", "--metrics-port", str(ports["failover-controller"]))
        ports["goodput"] = free_port()
        start("goodput", "goodput", "serve", "--job", f"lab={tmp_path / 'goodput.jsonl'}",
              "--port", str(ports["goodput"]))
        # Alerts are not this test's subject: Alertmanager posts them to a closed loopback port.
        stack = PromStack(tmp_path / "prom", ports, RULES, f"http://127.0.0.1:{free_port()}/", None).start()
        wait(lambda: stack.targets_up() == len(ports), 90, "Prometheus to scrape the agents, controller and goodput")
        # The Grafana variable `node` lists the agents' Hostnames.
        values = json.loads(_get(f"{stack.prometheus_url}/api/v1/label/Hostname/values?"
                                 + urllib.parse.urlencode({"match[]": "aidc_agent_info"})))["data"]
        assert values == NODES

        inject(lab / "nodes" / "gpu-1", "xid", gpu=0, xid=79)  # faults and XIDs to show
        live = [(name, expr) for name, expr in queries() if not is_pending(expr)]

        def without_data():
            return [name for name, expr in live if not stack.query(expr)]
        missing = wait(lambda: without_data() or None, 90, "every panel to have data", want_none=True)
        assert missing == [], f"panels without data: {missing}"
        for name, expr in queries():
            if is_pending(expr):  # accepted by Prometheus (a bad query raises), data or not
                stack.query(expr)
    finally:
        if stack:
            stack.stop()
        for proc in procs:
            stop_process_group(proc)


STACK = """config:
  aidc:cluster:
    name: dash
    device_backend: sim
    scheduler: lab
    node_pools:
      - {name: gpu, count: 2, gpu_model: SIM, gpus_per_node: 2}
    policy:
      max_unavailable: 1
      escalation: {burst_s: 0}
"""


def wait(predicate, timeout_s: float, what: str, want_none: bool = False):
    """Poll until `predicate()` is truthy (or, with want_none, until it returns None); returns
    the last value (the still-missing list when want_none times out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if (value is None) if want_none else value:
            return [] if want_none else value
        if time.monotonic() > deadline:
            if want_none:
                return value
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)
