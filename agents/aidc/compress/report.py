"""Results as a text table, Pareto plots (PNG), JSON, and an HTML section for the audit report."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from aidc.files import SHARED_MODE, write_atomic


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


QUALITY_TITLES = {"accuracy_pct": "accuracy (%)", "cosine_mean": "mean cosine similarity to the fp32 model"}
# One distinct marker and colour per technique: a legend names them, so no label is drawn
# beside a point and crowded points cannot hide each other's names.
MARKERS = "osD^vP*Xhp<>"
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _size_ticks(ax, values: list[float]) -> None:
    """Size axis: log scale only when the sizes span more than a decade; ticks at 1-2-5 steps,
    written as plain megabytes (no 10^x), so the axis is never bare."""
    import matplotlib.ticker as ticker

    lo, hi = min(values), max(values)
    if hi > 10 * lo > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def pareto_png(model: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig = pareto_figure(model)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pareto_figure(model: dict):
    """Quality against batch latency and against size on disk; the non-dominated techniques
    are drawn larger, edged in black and joined by a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    rows = model["rows"]
    quality_title = QUALITY_TITLES.get(model["quality_key"], model["quality_key"].replace("_", " "))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = (("latency", "batch_ms_normalised", 1.0,
               f"time per batch of {rows[0]['throughput_batch']} inputs (milliseconds, measured beside fp32)"),
              ("size", "disk_bytes", 1e-6, "size on disk (megabytes)"))
    handles = []
    for ax, (axis, key, scale, xlabel) in zip(axes, panels):
        xs = [r[key] * scale for r in rows]
        ys = [r["quality_value"] for r in rows]
        for i, (r, x, y) in enumerate(zip(rows, xs, ys)):
            front = r[f"pareto_{axis}"]
            h = ax.scatter([x], [y], s=90 if front else 45, marker=MARKERS[i % len(MARKERS)],
                           c=COLOURS[i % len(COLOURS)], edgecolors="black" if front else "none",
                           linewidths=1.2, zorder=3, label=r["label"])
            if axis == "latency":
                handles.append(h)
        front = sorted((x, y) for r, x, y in zip(rows, xs, ys) if r[f"pareto_{axis}"])
        if len(front) > 1:
            ax.plot(*zip(*front), c="black", lw=1, ls="--", zorder=2)
        if axis == "size":
            _size_ticks(ax, xs)
        else:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(quality_title)
        ax.set_title(f"quality against {'speed' if axis == 'latency' else 'size'} (up and left is better)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{model['model']}: compression techniques (black edge and dashed line: not beaten on both quality and cost)")
    ncol = min(len(rows), 3)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_rows = -(-len(rows) // ncol)
    fig.tight_layout(rect=(0, min(0.45, 0.05 * legend_rows + 0.03), 1, 1))
    return fig


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


def section_model(results: dict) -> dict:
    """What templates/compress.html.j2 shows: the tables as text, the plots as base64 PNG."""
    return {**results, "columns": COLUMNS,
            "models": [{**m, "table": table_rows(m), "png_b64": base64.b64encode(pareto_png(m)).decode()}
                       for m in results["models"]],
            "targets": [{**t, "measured_json": json.dumps(t["measured"], sort_keys=True)}
                        for t in results.get("targets") or []]}


def html_section(results: dict) -> str:
    """An HTML fragment (no <html>/<body>) for the audit report: tables, plots inline, recommendations."""
    from aidc.audit.templating import render

    return render("compress.html.j2", compress=section_model(results))


def write_outputs(results: dict, out_dir: str | Path) -> dict[str, str]:
    """results.json, one pareto-<model>.png per model and a standalone compress-report.html."""
    from aidc.audit.templating import render

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json"), "html": str(out / "compress-report.html")}
    write_atomic(out / "results.json", json.dumps(results, indent=2, sort_keys=True, default=str) + "\n", SHARED_MODE)
    for model in results["models"]:
        p = out / f"pareto-{model['model']}.png"
        write_atomic(p, pareto_png(model), SHARED_MODE)
        paths[f"png:{model['model']}"] = str(p)
    write_atomic(out / "compress-report.html", render("compress_page.html.j2", compress=section_model(results)),
                 SHARED_MODE)
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
