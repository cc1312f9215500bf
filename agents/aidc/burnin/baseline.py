"""Stored burn-in baselines per GPU model: the reference a node is judged against when its run has
no fleet (a node recertified alone) and a level a whole fleet cannot outvote.

`record` takes each node's latest burn-in certificate from the audit log, keeps the passing ones,
and stores per GPU model the median of each per-node figure (`judge.FLEET_METRICS`: GEMM, memory
copy, checkpoint storage) into a versioned JSON file under the lab/state directory
(`<lab-dir>/burnin-baselines.json`): `schema` says the format, `revision` counts recordings, and
each model keeps the nodes and certificate numbers it came from. Collective bandwidth is not a
per-node figure (it depends on who else took part) and is not stored.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from aidc.burnin.judge import FLEET_METRICS
from aidc.errors import BurninError
from aidc.files import write_atomic

SCHEMA = 1
FILE_NAME = "burnin-baselines.json"


def path_for(lab_dir: Path) -> Path:
    return Path(lab_dir) / FILE_NAME


def load(path: Path) -> dict[str, dict[str, float]]:
    """{gpu model: {metric: baseline}}; {} when no baseline was recorded. Raises BurninError with
    one line on a file that is not a baseline file of this schema."""
    return {model: entry["metrics"] for model, entry in _read(path)["models"].items()}


def _read(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {"schema": SCHEMA, "revision": 0, "models": {}}
    except OSError as exc:
        raise BurninError(f"cannot read burn-in baselines {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BurninError(f"burn-in baselines {path} is not JSON ({exc})".replace("\n", " ")) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise BurninError(f"burn-in baselines {path} has schema {got}; this aidc reads schema {SCHEMA}")
    models = doc.get("models")
    if not isinstance(models, dict) or not isinstance(doc.get("revision"), int):
        raise BurninError(f"burn-in baselines {path}: needs an integer `revision` and a `models` mapping")
    for model, entry in models.items():
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(metrics, dict):
            raise BurninError(f"burn-in baselines {path}: model {model!r} has no `metrics` mapping")
        for metric, value in metrics.items():
            if metric not in FLEET_METRICS:
                raise BurninError(f"burn-in baselines {path}: {model} names {metric!r}, not a per-node burn-in"
                                  f" figure (one of {', '.join(FLEET_METRICS)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise BurninError(f"burn-in baselines {path}: {model} {metric} must be a positive number, got"
                                  f" {str(value)[:40]!r}")
    return doc


def from_certificates(records, models: dict[str, str]) -> dict[str, dict]:
    """Per GPU model: the median of each per-node figure over the latest certificate of every node in
    `models` (node -> GPU model) that passed. A node whose latest certificate failed is no reference."""
    latest = {}
    for rec in records:  # in log order: a later certificate of a node replaces its earlier one
        if rec.node in models:
            latest[rec.node] = rec
    out: dict[str, dict] = {}
    for node, rec in sorted(latest.items()):
        if rec.payload.get("verdict") != "pass":
            continue
        entry = out.setdefault(models[node], {"nodes": [], "certificates": [], "values": {}})
        entry["nodes"].append(node)
        entry["certificates"].append(rec.seq)
        for metric in FLEET_METRICS:
            value = (rec.payload.get("metrics") or {}).get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                entry["values"].setdefault(metric, []).append(float(value))
    return {model: {"metrics": {m: statistics.median(v) for m, v in e["values"].items()}, "nodes": e["nodes"],
                    "certificates": e["certificates"]} for model, e in out.items()}


def record(path: Path, audit, models: dict[str, str]) -> dict:
    """Store baselines from the audit log's latest passing certificates of `models`' nodes as the
    next revision of `path`; models without a passing node keep their stored baseline. Returns the
    document written."""
    doc = _read(path)
    fresh = from_certificates(audit.records(kind="burnin.certificate"), models)
    if not fresh:
        raise BurninError(f"no passing burn-in certificate for {', '.join(sorted(models)) or 'any node'} in the"
                          " audit log: certify the nodes first (aidc burnin run)")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for entry in fresh.values():
        entry["recorded_at"] = now
    doc = {"schema": SCHEMA, "revision": doc["revision"] + 1, "models": {**doc["models"], **fresh}}
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc
