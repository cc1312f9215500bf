"""Every metric an alert rule or a runbook names is registered by the agent: the names are read
from runbooks/alerts/aidc-alerts.yml, runbooks/*.yaml and docs/runbooks/*.md, and a running
`aidc agent run --backend sim` is scraped over HTTP."""

from __future__ import annotations

import re
from pathlib import Path

from aidc.audit.log import AuditLog
from aidc.device import sim
from tests.health.conftest import free_port, metric_value, scrape, wait_for
from tests.health.test_cli import start_agent, stop_agent

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "runbooks/alerts/aidc-alerts.yml", *sorted((ROOT / "runbooks").glob("*.yaml")),
           *sorted((ROOT / "docs/runbooks").glob("*.md"))]
# A name ends in a letter or digit: `aidc_failover_*` in a comment is a family, not a metric.
METRIC = re.compile(r"\b((?:DCGM_FI_|aidc_)[A-Za-z0-9_]*[A-Za-z0-9])\b")
# Named by rules but not exported yet: none (a name here is a gap to close, not an exemption).
PENDING: dict[str, str] = {}
# Fleet-wide series the failover controller serves (`aidc failover run --metrics-port`), not the
# node agent; test_failover_breaker_cli.py scrapes a running controller for them.
SERVED_BY_CONTROLLER = {"aidc_failover_breaker_open", "aidc_failover_lease_held",
                        "aidc_failover_oldest_undecided_event_age_seconds",
                        "aidc_fleet_healthy_gpu_ratio",  # the fleet-health figure (aidc.fleet.metrics)
                        "aidc_failover_repeat_offender"}  # marks of aidc.failover.offenders
# Series that exist only once something happened: no sample before the first XID, or before a
# training job reports its step times (the straggler judgement's relative performance).
BORN_OF_EVENTS = {"aidc_xid_errors_total", "aidc_burnin_relative_perf"}


def named_metrics() -> set[str]:
    names = set()
    for path in SOURCES:
        names |= set(METRIC.findall(path.read_text()))
    return names


def certify(audit_path: Path, node: str) -> None:
    with AuditLog(audit_path) as audit:
        audit.append("burnin.certificate", "passed burn-in", actor="test:burnin", node=node, payload={
            "verdict": "pass", "reasons": [], "metrics": {"gemm_bf16_tflops": 0.9, "allreduce_busbw_gbps": 0.8},
            "fleet": {"stats": {"gemm_bf16_tflops": {"median": 1.0}, "allreduce_busbw_gbps": {"median": 1.0}}},
            "collectives": {"all_reduce": [
                {"bytes": 1024, "algbw_gbps": 1.0, "busbw_gbps": 1.5, "link_fraction": 0.15},
                {"bytes": 4 << 20, "algbw_gbps": 6.0, "busbw_gbps": 9.0, "link_fraction": 0.9}]}})


def test_the_rules_and_runbooks_name_the_metrics_this_test_reads():
    names = named_metrics()
    assert {"aidc_ib_port_up", "aidc_ib_link_downed_total", "aidc_burnin_passed", "aidc_audit_verify_ok",
            "aidc_checkpoint_volume_used_ratio", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "aidc_burnin_relative_perf"} <= names


def test_every_metric_a_rule_or_runbook_names_is_registered_by_a_running_agent(tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=2, rails=2)
    certify(tmp_path / "audit.db", "n1")
    port = free_port()
    proc = start_agent(tmp_path, "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir),
                       "--port", str(port), "--checkpoint-path", str(tmp_path))
    try:
        page = wait_for(lambda: (t := _scrape_or_none(port)) and "aidc_ib_port_up{" in t
                        and "aidc_burnin_passed{" in t and "aidc_audit_verify_ok{" in t and t)
    finally:
        code, _out, err = stop_agent(proc)
    assert code == 0, err
    registered = set(re.findall(r"^# TYPE (\S+) ", page, flags=re.M))
    with_samples = set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", page, flags=re.M))
    named = named_metrics()
    named -= SERVED_BY_CONTROLLER
    missing = named - registered - set(PENDING)
    assert not missing, f"named by rules/runbooks but not registered by the agent: {sorted(missing)}"
    empty = named - with_samples - BORN_OF_EVENTS - set(PENDING)
    assert not empty, f"registered but without a sample on a healthy node: {sorted(empty)}"
    assert set(PENDING) <= named and not set(PENDING) & registered, "PENDING lists only what is still missing"
    assert "aidc_burnin_relative_perf" in registered
    assert metric_value(page, "aidc_burnin_passed", Hostname="n1") == 1
    assert metric_value(page, "aidc_burnin_busbw_link_fraction", Hostname="n1", collective="all_reduce") == 0.9
    # What AidcStragglerNode and AidcBusbwRegression read: the certificate against the fleet.
    assert metric_value(page, "aidc_burnin_relative_perf", Hostname="n1", test="gemm_bf16_tflops") == 0.9
    assert metric_value(page, "aidc_burnin_relative_perf", Hostname="n1", test="allreduce_busbw_gbps") == 0.8
    assert metric_value(page, "aidc_audit_verify_ok", Hostname="n1") == 1
    assert 0 < metric_value(page, "aidc_checkpoint_volume_used_ratio", Hostname="n1", path=str(tmp_path)) < 1


def _scrape_or_none(port):
    try:
        return scrape(port)
    except OSError:
        return None


def test_the_fleet_wide_series_the_rules_name_are_the_failover_controllers(tmp_path):
    from aidc.failover.metrics import FailoverMetrics
    from aidc.spec import load_stack

    AuditLog(tmp_path / "audit.db").close()  # `aidc failover run` serves the figure of its own log
    metrics = FailoverMetrics()
    metrics.add_fleet_health(load_stack("lab"), tmp_path / "audit.db")
    text = metrics.text()
    served = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    assert SERVED_BY_CONTROLLER <= named_metrics() and SERVED_BY_CONTROLLER <= served
