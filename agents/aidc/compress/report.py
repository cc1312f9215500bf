"""Results as a text table, Pareto plots (PNG), JSON, and an HTML section for the audit report."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _quality(row: dict, unit: str) -> str:
    return f"{row['quality_value']:.2f}" if unit == "pt" else f"{row['quality_value']:.4f}"


COLUMNS = ("technique", "params", "disk MB", "linear x", "size x", "b1 ms", "batch ms", "speed x",
           "quality", "delta", "pareto")


def table_rows(model: dict) -> list[list[str]]:
    out = []
    for r in model["rows"]:
        marks = ("L" if r["pareto_latency"] else "") + ("S" if r["pareto_size"] else "")
        delta = f"{r['quality_delta']:+.2f}" if model["quality_unit"] == "pt" else f"{r['quality_delta']:+.4f}"
        out.append([r["label"], f"{r['params']:,}", _mb(r["disk_bytes"]),
                    f"{r['linear_ratio']:.2f}" if r["linear_ratio"] else "-", f"{r['size_ratio']:.2f}",
                    f"{r['latency_b1_ms']:.2f}", f"{r['batch_ms_normalised']:.1f}", f"{r['speedup_tp']:.2f}",
                    _quality(r, model["quality_unit"]), delta, marks or "-"])
    return out


def text_report(results: dict) -> str:
    lines = [f"aidc compress bench: torch {results['torch']}, {results['threads']} threads, "
             f"{results['cpu_capability']}, {'quick' if results['quick'] else 'full'} run, {results['duration_s']} s"]
    for model in results["models"]:
        rows = table_rows(model)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        lines.append("")
        lines.append(f"{model['model']} (quality: {model['quality_key']}; speed x at batch "
                     f"{model['rows'][0]['throughput_batch']}; pareto L=latency S=size)")
        lines.append("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
        for r in rows:
            lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        for s in model["skipped"]:
            lines.append(f"  skipped {s['technique']}: {s['reason']}")
        lines.append(f"recommendation: {model['recommendation']}")
    if results.get("targets"):
        lines.append("")
        lines.append("targets:")
        for t in results["targets"]:
            state = "not run" if t["met"] is None else ("met" if t["met"] else "NOT met")
            lines.append(f"  {t['id']}: {state} {json.dumps(t['measured'], sort_keys=True)}")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def pareto_png(model: dict) -> bytes:
    """Quality against batch latency and against size; non-dominated points ringed and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = model["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (axis, key, xlabel, scale) in zip(axes, (
            ("latency", "batch_ms_normalised", f"latency at batch {rows[0]['throughput_batch']} (ms, paired with fp32)", 1.0),
            ("size", "disk_bytes", "size on disk (MB)", 1e-6))):
        xs = [r[key] * scale for r in rows]
        ys = [r["quality_value"] for r in rows]
        for r, x, y in zip(rows, xs, ys):
            front = r[f"pareto_{axis}"]
            ax.scatter([x], [y], s=60 if front else 30, c="tab:red" if front else "tab:gray",
                       edgecolors="black" if front else "none", zorder=3)
            # numbers keep crowded points readable; the key below the plots names them
            ax.annotate(str(rows.index(r)), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        front = sorted((x, y) for r, x, y in zip(rows, xs, ys) if r[f"pareto_{axis}"])
        if len(front) > 1:
            ax.plot(*zip(*front), c="tab:red", lw=1, zorder=2)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(model["quality_key"])
        ax.grid(alpha=0.3)
    fig.suptitle(f"{model['model']}: quality vs cost (red: non-dominated)")
    key = "   ".join(f"{i} {r['label']}" for i, r in enumerate(rows))
    fig.text(0.01, 0.01, "\n".join(_wrap(key, 170)), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def results_from_audit(payloads: list[dict]) -> dict:
    """Rebuild a results document from `compress.result` audit payloads (the latest per model)."""
    latest = {p["model"]: p for p in payloads}
    last = payloads[-1]
    return {"torch": last["torch"], "threads": last["threads"], "cpu_capability": last.get("cpu_capability", "?"),
            "quick": last["quick"], "started": last.get("started", "?"),
            "models": [{"model": m, "rows": p["rows"], "skipped": p["skipped"],
                        "recommendation": p.get("recommendation", ""), "quality_key": p.get("quality_key", "quality"),
                        "quality_unit": p.get("quality_unit", "")} for m, p in latest.items()],
            "targets": [t for p in latest.values() for t in p.get("targets", [])]}


def html_section(results: dict) -> str:
    """An HTML fragment (no <html>/<body>) for the audit report: tables, plots inline, recommendations."""
    parts = [f"<section class=\"compress\"><h2>Compression benchmarks</h2>"
             f"<p>torch {html.escape(results['torch'])}, {results['threads']} threads, "
             f"{html.escape(results['cpu_capability'])}, {'quick' if results['quick'] else 'full'} run, "
             f"started {html.escape(results['started'])}.</p>"]
    for model in results["models"]:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                       for row in table_rows(model))
        png = base64.b64encode(pareto_png(model)).decode()
        parts.append(f"<h3>{html.escape(model['model'])}</h3>"
                     f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                     f"<p><strong>Recommendation:</strong> {html.escape(model['recommendation'])}</p>"
                     f"<img alt=\"Pareto plot for {html.escape(model['model'])}\" "
                     f"src=\"data:image/png;base64,{png}\"/>")
        for s in model["skipped"]:
            parts.append(f"<p>Skipped {html.escape(s['technique'])}: {html.escape(s['reason'])}</p>")
    if results.get("targets"):
        items = "".join(f"<li>{html.escape(t['id'])}: "
                        f"{'not run' if t['met'] is None else ('met' if t['met'] else 'NOT met')} "
                        f"<code>{html.escape(json.dumps(t['measured'], sort_keys=True))}</code></li>"
                        for t in results["targets"])
        parts.append(f"<h3>Targets</h3><ul>{items}</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def write_outputs(results: dict, out_dir: str | Path) -> dict[str, str]:
    """results.json, one pareto-<model>.png per model and a standalone compress-report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json"), "html": str(out / "compress-report.html")}
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    for model in results["models"]:
        p = out / f"pareto-{model['model']}.png"
        p.write_bytes(pareto_png(model))
        paths[f"png:{model['model']}"] = str(p)
    (out / "compress-report.html").write_text(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>aidc compression benchmarks</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
        "</style></head><body>\n" + html_section(results) + "\n</body></html>\n")
    return paths


def audit_results(results: dict, db_path: str | Path) -> list[int]:
    """One `compress.result` record per model in the audit log; returns their sequence numbers."""
    from aidc.audit.log import AuditLog, default_actor

    seqs = []
    with AuditLog(db_path) as log:
        for model in results["models"]:
            rec = log.append("compress.result", model["recommendation"], actor=default_actor("compress"),
                             payload={"model": model["model"], "quick": results["quick"],
                                      "threads": results["threads"], "torch": results["torch"],
                                      "cpu_capability": results["cpu_capability"], "started": results["started"],
                                      "recommendation": model["recommendation"],
                                      "quality_key": model["quality_key"], "quality_unit": model["quality_unit"],
                                      "rows": model["rows"], "skipped": model["skipped"],
                                      "targets": [t for t in results["targets"]
                                                  if t["id"].startswith(model["model"].split("-")[0])]})
            seqs.append(rec.seq)
    return seqs
