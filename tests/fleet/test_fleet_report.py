"""The report states the fleet-health figure beside its verdict, at the top of the page."""

from __future__ import annotations

from aidc.audit.log import AuditLog
from aidc.audit.report import render_html, render_json
from tests.report.test_report import Sections, squash


def test_the_verdict_banner_gives_the_fleet_health_figure_with_its_parts_and_lowest_point(fleet_lab):
    _, db, _ = fleet_lab
    with AuditLog(db, read_only=True) as log:
        page = render_html(log, now=1.8e9)
        data = render_json(log)
    banner = squash(Sections(page).text["verdict"])
    assert ("Fleet health: 80.0% of GPUs certified and in service (8 of 10); 80.0% before the first "
            "quarantine, lowest 60.0%.") in banner
    assert 'title="certified, in-service GPUs over installed GPUs (8 certified, 10 in service)' in page
    assert page.index('id="fleet-health"') < page.index("<main>")
    assert data["fleet_health"]["end"]["fleet"]["healthy_gpu_ratio"] == 0.8
    assert data["fleet_health"]["lowest_fleet_ratio"] == 0.6


def test_a_log_whose_stack_does_not_load_says_the_figure_was_not_computed(tmp_path):
    with AuditLog(tmp_path / "audit.db") as log:
        log.append("lab.start", "lab from stack gone", actor="lab", payload={"stack": "gone"})
        page = render_html(log, now=1.8e9)
    assert "Fleet health: not computed (stack 'gone' does not load here" in squash(Sections(page).text["verdict"])
