"""Chart geometry for the audit report: plain numbers (positions, ticks, labels) that the
Jinja templates turn into inline SVG. No drawing library and no script in the page: the
report stays one self-contained file that opens anywhere, printed or offline.

Every chart has a `viewBox` of width `WIDTH`; the page scales it to the screen (420 px phones
included), so positions are computed once, in viewBox units."""

from __future__ import annotations

import math

from aidc.units import human_bytes as size_label  # noqa: F401 (the report's name for it)

WIDTH = 520
ROW_H = 26
LABEL_W = 96  # room for node names and milestone names left of the plot
VALUE_W = 92  # room for the value printed right of each bar
AXIS_H = 38  # tick labels and the axis title under the plot


def nice_ticks(hi: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `hi` (1, 2 or 5 times a power of ten apart)."""
    if not hi > 0 or not math.isfinite(hi):
        return [0.0, 1.0]
    raw = hi / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    n = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(n + 1)]


def fmt(value: float) -> str:
    """A figure for a chart label: three significant digits, no exponent for ordinary sizes."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _x_axis(ticks: list[float], x0: float, plot_w: float, top: float, title: str) -> dict:
    span = ticks[-1] or 1.0
    return {"y": top, "title": title, "title_x": x0 + plot_w / 2, "title_y": top + 32,
            "ticks": [{"x": round(x0 + t / span * plot_w, 1), "label": fmt(t)} for t in ticks]}


def bar_rows(rows: list[dict], axis_title: str, unit: str, lines: list[dict] | None = None) -> dict:
    """Horizontal bars from zero, one row per item (`label`, `value`, `bad`), with vertical
    reference lines (`label`, `value`, `style`: median | threshold | floor) across all rows."""
    lines = [ln for ln in (lines or []) if ln.get("value") is not None]
    hi = max([r["value"] for r in rows] + [ln["value"] for ln in lines] + [0.0])
    ticks = nice_ticks(hi)
    span = ticks[-1] or 1.0
    x0, plot_w = LABEL_W, WIDTH - LABEL_W - VALUE_W
    height = len(rows) * ROW_H
    bars = [{"label": r["label"], "y": i * ROW_H + 5, "mid": i * ROW_H + ROW_H / 2 + 4, "bad": r.get("bad", False),
             "w": round(max(r["value"], 0) / span * plot_w, 1), "value": f"{fmt(r['value'])} {unit}".strip()}
            for i, r in enumerate(rows)]
    for b in bars:
        b["value_x"] = x0 + b["w"] + 4
    refs = [{"label": ln["label"], "style": ln["style"], "x": round(x0 + ln["value"] / span * plot_w, 1)}
            for ln in lines]
    return {"width": WIDTH, "height": height + AXIS_H + 4, "x0": x0, "plot_w": plot_w, "plot_h": height,
            "bar_h": ROW_H - 10, "bars": bars, "refs": refs, "axis": _x_axis(ticks, x0, plot_w, height, axis_title)}


def line_chart(series: list[dict], x_title: str, y_title: str, reference: dict | None = None) -> dict:
    """Lines over a log2 x axis (message sizes in bytes): `series` = [{name, points: [(bytes, y)]}];
    `reference` an optional horizontal line {label, value} (a link rate)."""
    points = [p for s in series for p in s["points"] if p[0] > 0]
    if not points:
        return {}
    lo, hi_x = math.log2(min(p[0] for p in points)), math.log2(max(p[0] for p in points))
    if hi_x == lo:
        hi_x = lo + 1
    hi_y = max([p[1] for p in points] + ([reference["value"]] if reference else []))
    y_ticks = nice_ticks(hi_y, 4)
    x0, plot_w, plot_h, top = 64, WIDTH - 64 - 20, 200, 10

    def x(b):
        return round(x0 + (math.log2(b) - lo) / (hi_x - lo) * plot_w, 1)

    def y(v):
        return round(top + plot_h - v / (y_ticks[-1] or 1.0) * plot_h, 1)

    # Size ticks on powers of two, thinned to at most 7 so labels never collide.
    exps = list(range(math.ceil(lo), math.floor(hi_x) + 1))
    stride = max(1, math.ceil(len(exps) / 7))
    x_ticks = [{"x": x(2 ** e), "label": size_label(2 ** e)} for e in exps[::stride]]
    palette = ("#1f5fa8", "#c2571a", "#2e7d32", "#8e24aa", "#00838f", "#6d4c41")
    lines = [{"name": s["name"], "color": palette[i % len(palette)],
              "path": " ".join(f"{x(b)},{y(v)}" for b, v in s["points"] if b > 0),
              "dots": [{"x": x(b), "y": y(v)} for b, v in s["points"] if b > 0]} for i, s in enumerate(series)]
    ref = {"label": reference["label"], "y": y(reference["value"])} if reference else None
    return {"width": WIDTH, "height": top + plot_h + 56 + 18 * len(lines), "x0": x0, "plot_w": plot_w, "top": top,
            "plot_h": plot_h, "bottom": top + plot_h, "x_ticks": x_ticks, "x_title": x_title, "y_title": y_title,
            "y_ticks": [{"y": y(t), "label": fmt(t)} for t in y_ticks], "lines": lines, "ref": ref,
            "legend_y": top + plot_h + 56}


