"""aidc_goodput_ettr{job} for Prometheus, read from the step log at each scrape."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from aidc.goodput import StepLog, job_report
from aidc.polling import free_port, wait_for


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def exporter(tmp_path):
    port = free_port()
    path = tmp_path / "g.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "aidc", "goodput", "serve", "--job", f"llm={path}",
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the exporter", lambda: _try(port), 30, 0.1)
        yield port, path
    finally:
        proc.terminate()
        proc.wait(10)


def _try(port: int):
    try:
        return _scrape(port)
    except OSError:
        return None


def test_the_exporter_follows_the_step_log_as_it_grows_and_flags_a_bad_one(exporter):
    port, path = exporter
    assert _sample(_scrape(port), 'aidc_goodput_log_ok{job="llm"}') == 0.0  # no log yet
    log = StepLog(path, job="llm")
    log.allocation(t=0.0)
    log.start(resumed_from=0, t=0.0)
    log.step_done(1, 1.0, 2.0)
    text = _scrape(port)
    assert _sample(text, 'aidc_goodput_ettr{job="llm"}') == pytest.approx(0.5)
    assert _sample(text, 'aidc_goodput_seconds{job="llm",part="restart"}') == pytest.approx(1.0)
    log.step_done(2, 2.0, 4.0)
    assert _sample(_scrape(port), 'aidc_goodput_ettr{job="llm"}') == pytest.approx(job_report(path).ettr)
    with open(path, "a") as f:
        f.write("not json\n")
    text = _scrape(port)
    assert _sample(text, 'aidc_goodput_log_ok{job="llm"}') == 0.0
    assert _sample(text, 'aidc_goodput_ettr{job="llm"}') == pytest.approx(0.75)  # the last good figure stays


def test_the_audit_report_shows_ettr_with_its_definition_and_the_advice(tmp_path):
    from aidc.audit import AuditLog
    from aidc.audit.report import render_html
    from aidc.goodput import job_advice

    log = StepLog(tmp_path / "g.jsonl", job="llm")
    log.allocation(t=0.0)
    log.start(resumed_from=0, t=0.0)
    for n in range(1, 4):
        log.step_done(n, n - 1.0, n - 0.1)
        log.checkpoint(n, n - 0.1, float(n), "sync")
    payload = {"goodput": job_report(tmp_path / "g.jsonl").to_dict(),
               "checkpoint_advice": job_advice(tmp_path / "g.jsonl", mtbf_s=600)}
    with AuditLog(tmp_path / "audit.db") as audit:
        audit.append("goodput.report", "job llm", actor="t", payload=payload)
        page = render_html(audit)
    assert "Goodput: job llm" in page and "ETTR 0.9" in page
    assert "productive training time / wall time of the job&#39;s allocation" in page
    assert "Checkpoint interval advised (Daly 2006)" in page
