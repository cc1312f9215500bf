"""The Grafana dashboard (dashboards/aidc.json): it is valid against Grafana's own published
dashboard schema (a pinned copy, tests/dashboards/schema/SOURCE.md), every query parses
(promtool), and every panel's query returns data from a real Prometheus scraping lab agents
(`aidc agent run --backend sim`), the failover controller, the goodput exporter and the runbook
receiver after a fault, except queries of metrics that other branches are adding now (PENDING
below). Its layout follows rules a reader can rely on: per-GPU panels filtered by `$node` and
`$gpu` for what dcgm-exporter's dashboard (grafana.com 12239) shows, words for 0/1 states,
thresholds on ratios, quarantine as annotations, a row for the controller and one for the
receiver."""

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
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$node": ".*", "$gpu": ".*"}
# Variables Grafana itself defines (https://grafana.com/docs/grafana/latest/dashboards/variables/
# add-template-variables/#global-variables): a query may use them without a template variable.
GRAFANA_GLOBALS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
                   "__all", "__dashboard", "__from", "__to", "__name", "__org", "__user", "timeFilter"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
METRIC = re.compile(r"\b(aidc_[a-z_]+|DCGM_FI_[A-Z_]+)\b")
# What dcgm-exporter's own dashboard (grafana.com 12239, "NVIDIA DCGM Exporter Dashboard") shows
# per GPU, by the DCGM field each panel reads.
DCGM_DASHBOARD_FIELDS = {"DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK",
                         "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_DEV_FB_USED"}
DCGM_DASHBOARD_URL = "https://grafana.com/grafana/dashboards/12239"
# Panel types that show something other than query results (no targets).
NO_QUERY = {"row", "text"}


def panels(kind: str | None = None) -> list[dict]:
    """The panels that query Prometheus (of one type)."""
    return [p for p in DASHBOARD["panels"] if p["type"] not in NO_QUERY and (kind is None or p["type"] == kind)]


def grafana_substitutes(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def queries() -> list[tuple[str, str]]:
    """(panel title / refId, the PromQL Prometheus receives) for every target of every panel,
    and for every annotation on the Prometheus data source."""
    out = [(f"{p['title']} / {t['refId']}", grafana_substitutes(t["expr"])) for p in panels() for t in p["targets"]]
    return out + [(f"annotation {a['name']}", grafana_substitutes(a["expr"])) for a in prometheus_annotations()]


def prometheus_annotations() -> list[dict]:
    return [a for a in DASHBOARD["annotations"]["list"] if a.get("datasource", {}).get("type") == "prometheus"]


def rows() -> dict[str, list[dict]]:
    """Each row's title -> the panels placed under it (rows are open: their panels follow them)."""
    out: dict[str, list[dict]] = {}
    ordered = sorted(DASHBOARD["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    current = None
    for p in ordered:
        if p["type"] == "row":
            current = out.setdefault(p["title"], [])
        else:
            assert current is not None, f"{p['title']} comes before the first row"
            current.append(p)
    return out


def zero_one_metrics() -> set[str]:
    """The gauges docs/metrics.md (the metric contract) describes as 1 in a state and 0 out of it."""
    found = set()
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] == "gauge" and re.match(r"1 (while|when)\b", cells[3]):
            found |= set(re.findall(r"`((?:aidc|DCGM_FI)_\w+)`", cells[0]))
    return found


def exported_names(registry) -> set[str]:
    """The metric names a prometheus_client registry exports (a counter's with `_total`)."""
    return {f"{family.name}_total" if family.type == "counter" else family.name for family in registry.collect()}


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

def test_every_variable_a_query_or_a_variable_uses_is_defined_before_it():
    defined: list[str] = []
    for variable in DASHBOARD["templating"]["list"]:
        used = {a or b for a, b in VARIABLE.findall(json.dumps(variable.get("query", "")))}
        assert used - GRAFANA_GLOBALS <= set(defined), variable["name"]
        defined.append(variable["name"])
    places = [(p["title"], json.dumps([p.get("datasource"), p.get("targets")])) for p in DASHBOARD["panels"]]
    places += [(a["name"], json.dumps(a)) for a in DASHBOARD["annotations"]["list"]]
    undefined = {(where, a or b) for where, text in places for a, b in VARIABLE.findall(text)
                 if (a or b) not in defined and (a or b) not in GRAFANA_GLOBALS}
    assert undefined == set()
    # The check can fail: a query of an undefined variable is caught.
    assert VARIABLE.findall('up{x=~"$nope"}') == [("", "nope")]


def test_a_gpu_variable_lists_the_chosen_nodes_gpus_and_every_per_gpu_panel_filters_by_node_and_gpu():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    gpu = variables["gpu"]
    assert gpu["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert re.fullmatch(r'label_values\((DCGM_FI_DEV_\w+)\{Hostname=~"\$node"\}, gpu\)', gpu["query"])
    assert (gpu["multi"], gpu["includeAll"], gpu["allValue"]) == (True, True, ".*")
    per_gpu = [p for p in rows()["Per GPU"] if p["type"] not in NO_QUERY]
    assert per_gpu
    for p in per_gpu:
        for t in p["targets"]:
            assert 'Hostname=~"$node"' in t["expr"] and 'gpu=~"$gpu"' in t["expr"], p["title"]
    # Only the per-GPU row filters by GPU: the fleet panels aggregate whole nodes.
    outside = [p["title"] for p in panels() if p not in per_gpu and "$gpu" in json.dumps(p["targets"])]
    assert outside == []


def test_the_per_gpu_row_shows_what_dcgm_exporters_dashboard_shows_or_says_why_not():
    from aidc.health.exporter import GPU_METRICS

    exported = {name for name, *_ in GPU_METRICS}
    per_gpu = rows()["Per GPU"]
    read = {m for p in per_gpu if p["type"] not in NO_QUERY for t in p["targets"] for m in METRIC.findall(t["expr"])}
    notes = " ".join(p["options"]["content"] for p in per_gpu if p["type"] == "text")
    for field in DCGM_DASHBOARD_FIELDS:
        if field in exported:
            assert field in read, f"{field}: exported by the agent, shown by 12239, not on the per-GPU row"
        else:
            assert field in notes and DCGM_DASHBOARD_URL in notes, f"{field}: not exported, and the row does not say so"
    assert DCGM_DASHBOARD_URL in [link["url"] for link in DASHBOARD["links"]]
    assert "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE" not in exported  # the one the agent cannot give (NVML has no profiling)


def test_a_panel_showing_a_zero_one_state_names_both_states():
    zero_one = zero_one_metrics()
    assert {"aidc_node_quarantined", "aidc_failover_breaker_open", "aidc_failover_lease_held",
            "aidc_burnin_passed", "aidc_audit_verify_ok"} <= zero_one
    states = []
    for p in panels():
        read = {m for t in p["targets"] for m in METRIC.findall(t["expr"])}
        # A count of nodes in a state (sum, count) is a number; max/min or the bare gauge is the state.
        counted = any(re.match(r"\s*(sum|count)\b", t["expr"]) for t in p["targets"])
        if read and read <= zero_one and not counted:
            states.append(p["title"])
            mapped = {value: option["text"] for mapping in p["fieldConfig"]["defaults"].get("mappings", [])
                      if mapping["type"] == "value" for value, option in mapping["options"].items()}
            assert set(mapped) == {"0", "1"} and all(mapped.values()), p["title"]
            assert mapped["0"] != mapped["1"], p["title"]
    assert len(states) >= 5, states


def _alert_threshold(alert: str) -> float:
    """The number an alert rule compares with (`... > 300`, `... < 0.75`)."""
    import yaml

    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if r.get("alert") == alert]
    return float(re.search(r"[<>]=?\s*([0-9.]+)\s*$", rules[0]["expr"].strip())[1])


def test_a_panel_of_a_ratio_has_thresholds_and_those_of_an_alert_match_its_rule():
    ratios = [p for p in panels() if p["fieldConfig"]["defaults"].get("unit") == "percentunit"
              or any(re.search(r"\)\s*/\s*", t["expr"]) for t in p["targets"])]
    assert len(ratios) >= 4, [p["title"] for p in ratios]
    for p in ratios:
        steps = p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        assert len(steps) >= 2 and steps[0]["value"] is None, p["title"]
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values) and len({s["color"] for s in steps}) == len(steps), p["title"]

    def steps_of(metric: str) -> list[float]:
        (panel,) = [p for p in panels() if any(metric in t["expr"] for t in p["targets"])
                    and p["fieldConfig"]["defaults"].get("thresholds")]
        return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]]
    # Where an alert fires on the panel's series, a colour changes at the alert's number.
    assert _alert_threshold("AidcStragglerNode") in steps_of("aidc_burnin_relative_perf")
    assert _alert_threshold("AidcBusbwRegression") in steps_of("aidc_burnin_relative_perf")
    assert _alert_threshold("AidcFailoverEventUndecided") in steps_of("aidc_failover_oldest_undecided_event_age")
    assert _alert_threshold("AidcFleetHealthLow") in steps_of("aidc_fleet_healthy_gpu_ratio")


def test_quarantine_and_the_breaker_are_annotations_from_prometheus():
    by_metric = {m: a for a in prometheus_annotations() for m in METRIC.findall(a["expr"])}
    quarantine = by_metric["aidc_node_quarantined"]
    assert quarantine["enable"] and 'Hostname=~"$node"' in quarantine["expr"]
    assert "{{Hostname}}" in quarantine["titleFormat"] and "Hostname" in quarantine["tagKeys"].split(",")
    assert by_metric["aidc_failover_breaker_open"]["enable"]
    for a in prometheus_annotations():
        assert a["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, a["name"]


def test_the_controller_row_and_the_receiver_row_show_every_metric_each_exports():
    from aidc.failover.metrics import FailoverMetrics
    from aidc.runbook.serve_metrics import ReceiverMetrics

    exporters = {"Failover controller": FailoverMetrics().registry,
                 "Alertmanager receiver (aidc runbook serve)": ReceiverMetrics(lambda: 0, dict).registry}
    for title, registry in exporters.items():
        names = exported_names(registry)
        assert len(names) >= 4, names
        read = {m for p in rows()[title] for t in p.get("targets", []) for m in METRIC.findall(t["expr"])}
        assert names - read == set(), f"{title}: no panel for {sorted(names - read)}"


def test_a_text_panel_has_content_and_no_queries():
    texts = [p for p in DASHBOARD["panels"] if p["type"] == "text"]
    for p in texts:
        assert p["options"]["mode"] == "markdown" and p["options"]["content"].strip(), p["title"]
        assert "targets" not in p, p["title"]


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


def _receiver_runbooks(dest: Path) -> Path:
    """A runbook directory holding one runbook whose run ends at once (its first step is a check
    that fails while the node's audit log verifies): every other alert is unmatched, so the
    receiver touches no node."""
    dest.mkdir()
    shutil.copy(ROOT / "runbooks" / "audit-verify-failed.yaml", dest)
    return dest


def _post(url: str, body: bytes, headers: dict) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                                    timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


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
    token_file = tmp_path / "receiver.token"
    token_file.write_text("dashboard-test-token")
    prom_port = free_port()

    def start(name: str, *args: str) -> None:
        with open(tmp_path / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "aidc", *args], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    try:
        for node in NODES:
            _certify(tmp_path / f"audit-{node}.db", node)
            # The lab's store, as `aidc lab` gives its agents: they report what failover decided.
            start(f"agent-{node}", "agent", "run", "--node", node, "--backend", "sim",
                  "--node-dir", str(node_dirs[node]), "--kernel-log", str(node_dirs[node] / "kern.log"),
                  "--store", str(lab / "state.db"), "--audit-db", str(tmp_path / f"audit-{node}.db"),
                  "--port", str(ports[node]))
        # The fleet-wide series: the failover controller's, the goodput exporter's and the receiver's.
        ports["failover-controller"] = free_port()
        start("controller", "failover", "run", "--stack", str(stack_file), "--lab-dir", str(lab), "--no-dry-run",
              "--poll", "0.05", "--metrics-port", str(ports["failover-controller"]))
        ports["goodput"] = free_port()
        start("goodput", "goodput", "serve", "--job", f"lab={tmp_path / 'goodput.jsonl'}",
              "--port", str(ports["goodput"]))
        ports["runbook-receiver"] = free_port()
        start("receiver", "runbook", "serve", "--port", str(ports["runbook-receiver"]),
              "--token-file", str(token_file), "--stack", str(stack_file), "--lab-dir", str(lab),
              "--state-db", str(tmp_path / "runbook-state.db"), "--audit-db", str(tmp_path / "runbook-audit.db"),
              "--runbooks", str(_receiver_runbooks(tmp_path / "runbooks")),
              "--prometheus", f"http://127.0.0.1:{prom_port}")
        alerts_url = f"http://127.0.0.1:{ports['runbook-receiver']}/alerts"
        # Alertmanager posts the rules' alerts to the receiver, with its token.
        stack = PromStack(tmp_path / "prom", ports, RULES, alerts_url, token_file, prom_port=prom_port).start()
        wait(lambda: stack.targets_up() == len(ports), 90,
             "Prometheus to scrape the agents, controller, goodput exporter and receiver")
        # The Grafana variables: `node` lists the agents' Hostnames, `gpu` the GPUs of those nodes.
        values = json.loads(_get(f"{stack.prometheus_url}/api/v1/label/Hostname/values?"
                                 + urllib.parse.urlencode({"match[]": "aidc_agent_info"})))["data"]
        assert values == NODES
        variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
        selector = re.fullmatch(r"label_values\((.+), gpu\)", variables["gpu"]["query"])[1]
        gpus = json.loads(_get(f"{stack.prometheus_url}/api/v1/label/gpu/values?"
                               + urllib.parse.urlencode({"match[]": grafana_substitutes(selector)})))["data"]
        assert gpus == ["0", "1"]

        inject(lab / "nodes" / "gpu-1", "xid", gpu=0, xid=79)  # faults and XIDs to show
        # A caller without the token is refused; an alert with a runbook runs it to its end.
        assert _post(alerts_url, b"[]", {"Content-Type": "application/json"}) == 401
        stack.push_alert({"alertname": "AidcAuditVerifyFailed", "Hostname": "gpu-1", "severity": "critical"})
        live = [(name, expr) for name, expr in queries() if not is_pending(expr)]

        def without_data():
            return [name for name, expr in live if not stack.query(expr)]
        missing = wait(lambda: without_data() or None, 120, "every panel and annotation to have data", want_none=True)
        assert missing == [], f"panels without data: {missing}"
        for name, expr in queries():
            if is_pending(expr):  # accepted by Prometheus (a bad query raises), data or not
                stack.query(expr)
        # The annotations mark what happened: failover quarantined gpu-0 (the escalated XID 31)
        # and gpu-1's XID 79 was one quarantine too many, which opened the breaker.
        (quarantine,) = [expr for name, expr in queries() if name == "annotation Quarantine"]
        assert [r["metric"]["Hostname"] for r in stack.query(quarantine)] == ["gpu-0"]
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
      max_unavailable: 2
      escalation: {burst_s: 0}
      breaker: {max_quarantines: 1}
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
