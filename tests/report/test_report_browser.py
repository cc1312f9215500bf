"""The audit report in a real browser (Debian's chromium, driven by Playwright): at a desktop
width and at a 420 px phone width it loads with no console error, every image decodes, nothing
overflows sideways on the phone, the lab's page is at most 3,000 px long on a desktop (the
detail tables are collapsed), and the verdict banner and the failover timeline chart are on
screen. Screenshots of both widths are kept (path printed) for a person to look at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from aidc.audit.log import AuditLog
from aidc.audit.report import write_report
from aidc.compress.report import audit_results

from .lab_log import append_goodput_report, build_lab_audit_log, compress_results

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DESKTOP = 1280
MAX_DESKTOP_HEIGHT_PX = 3000
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "report"


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    pytest.importorskip("matplotlib")
    base = tmp_path_factory.mktemp("report")
    db = build_lab_audit_log(base)
    audit_results(compress_results(), db)
    with AuditLog(db, read_only=True) as log:
        html_path, _, verified = write_report(log, base / "out")
    assert verified.ok
    return html_path


@pytest.fixture(scope="module")
def lab_report_page(tmp_path_factory):
    """The report of a lab loop as `aidc lab run` writes it: the burn-in's own certificates (five
    collective sweeps), the failover, goodput with its accounting (no compression benchmark)."""
    base = tmp_path_factory.mktemp("lab-report")
    db = build_lab_audit_log(base, with_collectives=False)
    with AuditLog(db) as log:
        append_goodput_report(log)
        html_path, _, verified = write_report(log, base / "out")
    assert verified.ok
    return html_path


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make system-deps installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        # Root (as in CI containers) needs --no-sandbox; Playwright's own browser download is not used.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.mark.parametrize("width", [DESKTOP, 420])
def test_the_report_renders_cleanly_at_desktop_and_phone_width(report_page, browser, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
    page.goto(report_page.as_uri(), wait_until="load")
    try:
        assert problems == []
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        assert images and all(ok for _, ok in images), images
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a {width} px screen"

        banner = page.locator("#verdict")
        assert banner.is_visible() and banner.bounding_box()["y"] < 5  # first thing on the page
        assert "Loop completed" in banner.inner_text()
        chart = page.locator("#failover svg.timeline")
        assert chart.count() == 1 and chart.is_visible()
        box = chart.bounding_box()
        assert 0 < box["width"] <= width and box["height"] > 60
        labels = chart.locator("text.label").all_text_contents()
        assert labels == ["detect", "decide", "quarantine", "resume"]
        assert page.locator("#burnin svg.bars").count() >= 3 and page.locator("#collectives svg.lines").is_visible()
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"report-{width}px.png"
        page.screenshot(path=str(shot), full_page=True)
        page.close()
        print(f"screenshot: {shot}")


def test_the_lab_report_fits_in_3000_px_on_a_desktop_with_its_detail_tables_collapsed(lab_report_page, browser):
    page = browser.new_page(viewport={"width": DESKTOP, "height": 900})
    try:
        page.goto(lab_report_page.as_uri(), wait_until="load")
        height = page.evaluate("document.documentElement.scrollHeight")
        assert height <= MAX_DESKTOP_HEIGHT_PX, f"the lab's report is {height} px long"
        assert page.locator("details[open]").count() == 0
        assert page.locator("#collectives details").count() == 5  # one per collective, each closed
        assert page.locator("#verdict").bounding_box()["y"] < 5
    finally:
        page.screenshot(path=str(ARTIFACTS / "lab-report-desktop.png"), full_page=True)
        page.close()
