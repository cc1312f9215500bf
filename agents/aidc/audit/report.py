"""Audit reports: one self-contained HTML page (timeline, burn-in per node) and JSON."""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

from aidc.audit.log import AuditLog, AuditRecord, VerifyResult

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.pass{color:#0a6b0a;font-weight:600}.fail{color:#b00020;font-weight:600}
.ok{background:#e8f5e9;padding:.5em}.bad{background:#fdecea;padding:.5em}code{font-size:.85em}
"""


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _e(value) -> str:
    return html.escape(str(value))


def _burnin_table(certs: list[AuditRecord]) -> str:
    if not certs:
        return "<p>No burn-in certificates.</p>"
    keys: list[str] = []
    for c in certs:
        for k, v in (c.payload.get("metrics") or {}).items():
            if k not in keys and isinstance(v, (int, float)):
                keys.append(k)
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    rows = []
    for c in certs:
        m = c.payload.get("metrics") or {}
        passed = c.payload.get("verdict") == "pass"
        verdict = f'<span class="{"pass" if passed else "fail"}">{"PASS" if passed else "FAIL"}</span>'
        cells = "".join(f"<td>{m[k]:.4g}</td>" if isinstance(m.get(k), (int, float)) else "<td>-</td>" for k in keys)
        reasons = "<br>".join(_e(r) for r in c.payload.get("reasons", [])) or "-"
        rows.append(f"<tr><td>{_e(c.node)}</td><td>{verdict}</td>{cells}<td>{reasons}</td></tr>")
    return f"<table><tr><th>node</th><th>verdict</th>{head}<th>reasons</th></tr>{''.join(rows)}</table>"


def _summary_value(key: str, value):
    if key == "checkpoint_key" and isinstance(value, dict) and value:
        return (f"{value.get('cipher')}, key {value.get('key_id')} version {value.get('key_version')} "
                f"({value.get('provider')})")
    return value


def render_html(log: AuditLog, verified: VerifyResult | None = None) -> str:
    records = log.records()
    verified = verified or log.verify()
    certs = [r for r in records if r.kind == "burnin.certificate"]
    summary = next((r.payload for r in reversed(records) if r.kind == "lab.summary"), None)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>aidc audit report</title>"
             f"<style>{CSS}</style></head><body><h1>aidc audit report</h1>",
             f"<p>Audit log <code>{_e(log.path)}</code>: {verified.records} records. </p>",
             ("<p class='ok'>Hash chain verified: every record intact.</p>" if verified.ok else
              f"<p class='bad'>Verification FAILED at record {verified.first_bad_seq}: {_e(verified.problem)}</p>")]
    if summary:
        keys = ["certified_nodes", "victim", "xid", "detect_ms", "resume_s", "steps_lost", "ettr", "train_steps", "checkpoint_key", "wall_s"]
        parts.append("<h2>Lab loop</h2><table>" + "".join(
            f"<tr><th>{k}</th><td>{_e(_summary_value(k, summary.get(k)))}</td></tr>" for k in keys if k in summary)
            + "</table>")
    parts.append("<h2>Burn-in per node</h2>" + _burnin_table(certs))
    goodput = [r.payload for r in records if r.kind == "goodput.report"]
    if goodput:
        from aidc.goodput.html import html_section

        parts.append(html_section(goodput[-1]))
    compress = [r.payload for r in records if r.kind == "compress.result"]
    if compress:
        from aidc.compress.report import html_section, results_from_audit

        parts.append(html_section(results_from_audit(compress)))
    rows = "".join(
        f"<tr><td>{r.seq}</td><td>{_when(r.ts)}</td><td>{_e(r.kind)}</td><td>{_e(r.node or '-')}</td>"
        f"<td>{_e(r.actor)}</td><td>{_e(r.reason)}</td></tr>" for r in records)
    parts.append("<h2>Timeline</h2><table><tr><th>#</th><th>time (UTC)</th><th>kind</th><th>node</th>"
                 f"<th>actor</th><th>reason</th></tr>{rows}</table></body></html>")
    return "\n".join(parts)


def render_json(log: AuditLog, verified: VerifyResult | None = None) -> dict:
    return {"verification": (verified or log.verify()).to_dict(),
            "records": [r.__dict__ for r in log.records()]}


def write_report(log: AuditLog, out_dir: str | Path) -> tuple[Path, Path, VerifyResult]:
    """Write report.html and report.json; the chain is verified once for both (and returned)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verified = log.verify()
    html_path, json_path = out / "report.html", out / "report.json"
    html_path.write_text(render_html(log, verified))
    json_path.write_text(json.dumps(render_json(log, verified), indent=1, default=str))
    return html_path, json_path, verified
