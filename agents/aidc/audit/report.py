"""Audit reports: one self-contained HTML page and JSON.

The page (templates/report.html.j2, autoescaped) opens with a verdict banner, then the lab
loop's figures, the failover timeline of each incident, burn-in per node against the fleet,
the collective sweep, goodput, compression benchmarks, and the records: incident timeline,
dry runs and benchmark records in separate tables. Charts are inline SVG drawn by the
templates from data (aidc.audit.charts); the page loads nothing from anywhere."""

from __future__ import annotations

import json
import time
from pathlib import Path

from aidc.audit import report_model
from aidc.audit.log import AuditLog, VerifyResult
from aidc.audit.templating import render
from aidc.files import FILE_MODE, derived_mode, write_atomic


def render_html(log: AuditLog, verified: VerifyResult | None = None, now: float | None = None) -> str:
    records = log.records()
    verified = verified or log.verify()
    model = report_model.build(records, verified, str(log.path), time.time() if now is None else now)
    model["fleet_health"] = fleet_health(records)
    compress = [r.payload for r in records if r.kind == "compress.result"]
    if compress:
        from aidc.compress.report import results_from_audit, section_model

        model["compress"] = section_model(results_from_audit(compress))
    else:
        model["compress"] = None
    return render("report.html.j2", **model)


def fleet_health(records) -> dict | None:
    """The fleet-health figure (aidc.fleet.figure) of the stack the lab run names."""
    from aidc.fleet.figure import for_report

    return for_report(records, report_model.stack_info(records)["stack"])


def render_json(log: AuditLog, verified: VerifyResult | None = None) -> dict:
    records = log.records()
    return {"verification": (verified or log.verify()).to_dict(), "flags": report_model.flags(records),
            "fleet_health": fleet_health(records),
            "escalations_and_breaker": report_model.failover_rows(records),
            "records": [r.__dict__ for r in records]}


def write_report(log: AuditLog, out_dir: str | Path) -> tuple[Path, Path, VerifyResult]:
    """Write report.html and report.json; the chain is verified once for both (and returned).

    Both hold the log's records, so they get the log's mode (a 0600 log gives 0600 reports)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verified = log.verify()
    html_path, json_path = out / "report.html", out / "report.json"
    # A log in PostgreSQL has no file mode to follow: its reports are private.
    mode = derived_mode(log.path) if isinstance(log.path, Path) else FILE_MODE
    write_atomic(html_path, render_html(log, verified), mode)
    write_atomic(json_path, json.dumps(render_json(log, verified), indent=1, default=str), mode)
    return html_path, json_path, verified
