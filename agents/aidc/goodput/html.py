"""The audit report's goodput section: ETTR with its definition, the wall time by part, the advice."""

from __future__ import annotations

import html

from aidc.goodput.accounting import CATEGORIES, ETTR_DEFINITION

PART_MEANING = {
    "productive": "steps of the trajectory the job kept",
    "checkpoint": "training stood still for a checkpoint",
    "detection": "from a fault to its detection",
    "restart": "start and restarts: teardown, rendezvous, process start, restore",
    "lost": "steps redone after a restore, and the step a fault cut short",
    "idle": "everything else",
}


def _e(value) -> str:
    return html.escape(str(value))


def html_section(payload: dict) -> str:
    g = payload.get("goodput") or {}
    advice = payload.get("checkpoint_advice") or {}
    seconds, fractions = g.get("seconds", {}), g.get("fractions", {})
    rows = "".join(f"<tr><td>{_e(p)}</td><td>{seconds.get(p, 0):.2f}</td><td>{fractions.get(p, 0) * 100:.1f} %</td>"
                   f"<td>{_e(PART_MEANING[p])}</td></tr>" for p in CATEGORIES)
    out = [f"<h2>Goodput: job {_e(g.get('job'))}</h2>",
           f"<p><b>ETTR {_e(g.get('ettr'))}</b>. {_e(ETTR_DEFINITION)}; the allocation runs from the job's first "
           f"record (its allocation) to its end, {_e(g.get('wall_s'))} s here.</p>",
           "<table><tr><th>part</th><th>seconds</th><th>share</th><th>what</th></tr>" + rows + "</table>"]
    if "error" in advice:
        out.append(f"<p>Checkpoint interval: {_e(advice['error'])}</p>")
    elif advice:
        out.append(f"<p>Checkpoint interval advised (Daly 2006): every {_e(advice['advised_interval_s'])} s of compute"
                   f" (Young: {_e(advice['young_interval_s'])} s), expected ETTR {_e(advice['expected_ettr_advised'])};"
                   f" now every {_e(advice['current_interval_s'])} s, expected ETTR "
                   f"{_e(advice['expected_ettr_current'])}. Save cost {_e(advice['save_cost_s'])} s, MTBF "
                   f"{_e(advice['mtbf']['seconds'])} s ({_e(advice['mtbf']['source'])}).</p>")
    return "\n".join(out)
