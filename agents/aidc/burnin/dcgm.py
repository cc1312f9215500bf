"""DCGM diagnostics where present: `dcgmi diag -r LEVEL -j`, folded into the node's verdict.

The level comes from the spec (`policy.burnin.dcgm_diag_level`: 1 quick, 2 medium, 3 long,
4 extended). Both JSON layouts dcgmi has printed are read (recorded examples and their sources:
tests/burnin/data/dcgm/SOURCES.md):

- DCGM 4: `{"DCGM Diagnostic": {"test_categories": [{"category", "tests": [{"name", "results":
  [{"entity_group": "GPU", "entity_id": 0, "status": "Pass", "warnings": [{"warning": ...}]}]}]}]},
  "metadata": {"version", "Driver Version Detected"}}`;
- DCGM 3 / NVVS: `{"DCGM GPU Diagnostic": {"test_categories": [... {"gpu_ids": "0,1,2,3" or
  "gpu_id": "0", "status": "PASS", "warnings": ["text"]}]}], "version"}}`.

A test that failed fails its GPUs and the node; a status word DCGM never printed is not read as
a pass. A node without `dcgmi` is not failed: the certificate says the diagnostics did not run.
"""

from __future__ import annotations

import json
import shutil
import subprocess

STATUS = {"pass": "pass", "fail": "fail", "warn": "warn", "warning": "warn", "skip": "skip", "skipped": "skip",
          "not run": "not_run", "notrun": "not_run"}
TOP_KEYS = ("DCGM Diagnostic", "DCGM GPU Diagnostic")
OUTPUT_TAIL = 400  # characters of dcgmi's own output kept in a reason


def _document(text: str) -> dict:
    """The JSON object in dcgmi's output (it may print a line or two before it)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON document in dcgmi's output")
    doc = json.loads(text[start:])
    if not isinstance(doc, dict):
        raise ValueError("dcgmi's output is not a JSON object")
    return doc


def _gpus(result: dict) -> list[int | None]:
    if result.get("entity_group", "GPU") == "GPU" and isinstance(result.get("entity_id"), int):
        return [result["entity_id"]]
    ids = result.get("gpu_id", result.get("gpu_ids"))
    if isinstance(ids, int):
        return [ids]
    if isinstance(ids, str) and ids.strip():
        return [int(part.strip().removeprefix("gpu")) for part in ids.split(",") if part.strip()]
    return [None]  # a result for the node as a whole


def _warnings(result: dict) -> list[str]:
    out = []
    for w in result.get("warnings") or []:
        out.append(str(w.get("warning", w)) if isinstance(w, dict) else str(w))
    return out


def parse_diag(text: str) -> dict:
    """{"version", "driver", "runtime_error", "results": [{"category", "test", "gpu", "status",
    "warnings"}]}: one result per test and GPU. ValueError when it is not a diag document."""
    doc = _document(text)
    top = next((doc[k] for k in TOP_KEYS if isinstance(doc.get(k), dict)), None)
    if top is None:
        raise ValueError(f"no {' or '.join(repr(k) for k in TOP_KEYS)} object in dcgmi's output")
    categories = top.get("test_categories", [])
    if not isinstance(categories, list):
        raise ValueError("test_categories is not a list")
    results = []
    for category in categories:
        for test in category.get("tests", []) if isinstance(category, dict) else []:
            for result in test.get("results", []) if isinstance(test, dict) else []:
                if not isinstance(result, dict):
                    continue
                status = STATUS.get(str(result.get("status", "")).strip().lower(), "unknown")
                for gpu in _gpus(result):
                    results.append({"category": category.get("category"), "test": test.get("name"), "gpu": gpu,
                                    "status": status, "raw_status": result.get("status"),
                                    "warnings": _warnings(result)})
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return {"version": metadata.get("version", top.get("version")),
            "driver": metadata.get("Driver Version Detected", metadata.get("driver_version")),
            "runtime_error": top.get("runtime_error"), "results": results}


def run_diag(level: int, timeout_s: float, path: str | None = None) -> dict:
    """Run `dcgmi diag -r LEVEL -j` when dcgmi is on PATH (`path` overrides the PATH searched)."""
    exe = shutil.which("dcgmi", path=path)
    if exe is None:
        return {"present": False, "level": level,
                "note": "dcgmi not found on this node: DCGM diagnostics not run"}
    command = [exe, "diag", "-r", str(level), "-j"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"present": True, "level": level, "error": f"dcgmi diag -r {level} did not finish within {timeout_s:g} s"}
    except OSError as exc:
        return {"present": True, "level": level, "error": f"dcgmi diag -r {level} could not run: {exc}"}
    # dcgmi exits non-zero when a test fails; the document says which, so the code is only evidence.
    try:
        return {"present": True, "level": level, "exit_code": done.returncode, **parse_diag(done.stdout)}
    except ValueError as exc:
        said = " ".join((done.stdout + " " + done.stderr).split())[-OUTPUT_TAIL:]
        return {"present": True, "level": level, "exit_code": done.returncode,
                "error": f"dcgmi diag -r {level} printed no result document ({exc}; exit {done.returncode}): {said}"}


def verdict(diag: dict) -> tuple[list[str], list[str], list[int]]:
    """(reasons, notes, failed GPU indices) of one node's `run_diag` result."""
    if not diag:
        return [], [], []
    if not diag.get("present"):
        return [], [diag.get("note", "DCGM diagnostics not run")], []
    level = diag.get("level")
    if diag.get("error"):
        return [f"DCGM diagnostics: {diag['error']}"], [], []
    reasons, notes, failed = [], [], set()
    if diag.get("runtime_error"):
        reasons.append(f"DCGM diag level {level}: runtime error: {diag['runtime_error']}")
    for r in diag.get("results", []):
        where = "the node" if r["gpu"] is None else f"GPU {r['gpu']}"
        said = f": {'; '.join(r['warnings'])}" if r["warnings"] else ""
        if r["status"] in ("fail", "unknown"):
            word = "failed" if r["status"] == "fail" else f"reported {r.get('raw_status')!r}, not a pass"
            reasons.append(f"DCGM diag level {level}: {r['test']} {word} on {where}{said}")
            if r["gpu"] is not None:
                failed.add(r["gpu"])
        elif r["status"] == "warn":
            notes.append(f"DCGM diag level {level}: {r['test']} warned on {where}{said}")
    if not diag.get("results") and not reasons:
        reasons.append(f"DCGM diag level {level}: the document holds no test result")
    return reasons, notes, sorted(failed)
