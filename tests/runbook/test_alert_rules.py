"""The alert rules file: promtool accepts it, its unit tests pass, and it keeps the metrics contract."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "runbooks/alerts/aidc-alerts.yml"
TESTS = sorted((ROOT / "runbooks/alerts/tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; "
                                                              "`make system-deps` installs it)")
ISSUE_CONDITIONS = {  # the issue's list of conditions -> the alert(s) covering it
    "fatal XID": ["AidcGpuFatalXid"], "double-bit ECC": ["AidcGpuDoubleBitEcc"],
    "row remap pending / failure": ["AidcGpuRowRemapPending", "AidcGpuRowRemapFailure"],
    "thermal / power throttling": ["AidcGpuThermalThrottling", "AidcGpuPowerThrottling"],
    "NVLink down": ["AidcNvlinkDown"], "PCIe below max": ["AidcPcieLinkDegraded"],
    "InfiniBand down / flapping": ["AidcInfinibandLinkDown", "AidcInfinibandLinkFlapping"],
    "agent down": ["AidcAgentDown"], "monitor hung": ["AidcMonitorHung"], "burn-in failed": ["AidcBurninFailed"],
    "straggler": ["AidcStragglerNode"], "audit verification failed": ["AidcAuditVerifyFailed"],
}


def rules() -> dict[str, dict]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


@needs_promtool
def test_promtool_accepts_the_rule_file():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", TESTS, ids=[p.stem for p in TESTS])
def test_promtool_unit_tests_pass(test_file):
    out = subprocess.run([PROMTOOL, "test", "rules", test_file.name], cwd=test_file.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path):
    # A wrong expectation (the alert at a time it cannot fire yet) must fail the run.
    bad = yaml.safe_load((ROOT / "runbooks/alerts/tests/node.yml").read_text())
    bad["rule_files"] = [str(RULES)]
    bad["tests"][0]["alert_rule_test"][0]["exp_alerts"] = bad["tests"][0]["alert_rule_test"][1]["exp_alerts"]
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([PROMTOOL, "test", "rules", "bad.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0


def test_every_issue_condition_has_an_alert():
    have = set(rules())
    for condition, names in ISSUE_CONDITIONS.items():
        assert set(names) <= have, f"{condition}: missing {set(names) - have}"


def test_every_rule_has_severity_summary_and_runbook():
    for name, rule in rules().items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"], name
        assert (ROOT / "runbooks" / f"{rule['annotations']['runbook']}.yaml").exists(), name


def test_rules_use_only_metrics_of_the_contract():
    documented = set(re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", (ROOT / "docs/metrics.md").read_text())) | {"up"}
    for name, rule in rules().items():
        used = set(re.findall(r"\b((?:DCGM_FI_|aidc_)[A-Za-z0-9_]+|up)\b", rule["expr"]))
        assert used and used <= documented, f"{name} uses undocumented {used - documented}"


def test_each_rule_is_tested_firing_and_not_firing():
    fired, silent = set(), set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(rules()) <= fired, f"never tested firing: {set(rules()) - fired}"
    assert set(rules()) <= silent, f"never tested silent: {set(rules()) - silent}"


RUNBOOK_URL_BASE = "https://github.com/aidc-project/aidc/blob/main/docs/runbooks/"


def test_every_rule_links_its_runbook_page_and_the_page_exists():
    for name, rule in rules().items():
        runbook = rule["annotations"]["runbook"]
        assert rule["annotations"].get("runbook_url") == f"{RUNBOOK_URL_BASE}{runbook}.md", name
        assert (ROOT / "docs/runbooks" / f"{runbook}.md").is_file(), f"{name}: docs/runbooks/{runbook}.md missing"


def test_every_dcgm_series_in_a_rule_names_the_job_it_reads():
    from aidc.health.exporter import DCGM_EXPORTER_DEFAULTS

    for name, rule in rules().items():
        for metric, selector in re.findall(r"\b(DCGM_FI_[A-Z0-9_]+)(\{[^}]*\})?", rule["expr"]):
            if metric in DCGM_EXPORTER_DEFAULTS:  # left to dcgm-exporter when it runs beside the agent
                assert 'job=~"aidc-agent|nvidia-dcgm-exporter|dcgm-exporter"' in selector, (name, metric)
            else:
                assert 'job="aidc-agent"' in selector, (name, metric)
