"""NCCL settings from measurement: sweep the knobs of `bench/nccl_knobs.json` one at a time,
each trial a fresh `bench/nccl_trial.py` process with the variables set, and propose the best.

The search is coordinate descent: a baseline with none of the knobs set, then each knob's
values with the best values found so far fixed. A value is kept only when the median of its
trials beats the best so far by `min_gain`; otherwise NCCL's own default stays (a setting
that wins by noise is worse than none). The proposal is written as
  nccl.conf            KEY=VALUE lines, for /etc/nccl.conf or NCCL_CONF_FILE
  nccl_overrides.json  {"aidc_nccl_overrides": {...}}: `ansible-playbook -e @nccl_overrides.json`
                       renders them into /etc/nccl.conf through the `nccl` role
  nccl_sweep.json      every trial: its environment, figures or error
`python bench/nccl_sweep.py [--out DIR]` runs it alone; bench/gpu_check.sh runs it on GPU hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
KNOBS_FILE = HERE / "nccl_knobs.json"


class SweepError(Exception):
    """No trial could be measured (no CUDA, one GPU, NCCL failing at baseline)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def load_knobs(path: Path = KNOBS_FILE) -> dict:
    doc = json.loads(Path(path).read_text())
    for knob in doc["knobs"]:
        if not knob["name"].startswith("NCCL_") or not knob["values"]:
            raise ValueError(f"{path}: knob {knob['name']!r} must be an NCCL_ variable with values")
    return doc


def run_trial(env: dict[str, str], swept: list[str], trial_args: list[str], timeout_s: float = 120.0) -> dict:
    """One fresh process with `env` set and every other swept knob unset; its JSON answer plus
    `exit_code`. A process that prints nothing parseable is an error row, not an exception."""
    child_env = {k: v for k, v in os.environ.items() if k not in swept}
    child_env.update(env)
    agents = str(HERE.parent / "agents")  # the trial imports aidc.burnin.collectives from this checkout
    child_env["PYTHONPATH"] = agents + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, str(HERE / "nccl_trial.py"), *trial_args], env=child_env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"env": env, "error": f"no answer within {timeout_s:.0f} s", "exit_code": None}
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        doc = {"env": env, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:] or 'no output'}"}
    doc["exit_code"] = proc.returncode
    return doc


def coordinate_sweep(knobs: list[dict], trial: Callable[[dict[str, str]], dict], trials: int = 2,
                     min_gain: float = 0.05, deadline: float | None = None) -> dict:
    """Returns {"best": {knob: value}, "baseline_gbps", "best_gbps", "rows": [...]}.

    `trial(env)` runs one measurement and returns a dict with `score_gbps` or `error`
    (and `exit_code`). Raises SweepError when the baseline cannot be measured at all. Past
    `deadline` (time.monotonic()) the remaining settings are listed as not tried.
    """
    rows: list[dict] = []

    def measure(env: dict[str, str]) -> float | None:
        if env and deadline is not None and time.monotonic() > deadline:
            rows.append({"env": dict(env), "skipped": "the sweep's time budget was spent"})
            return None
        results = [trial(env) for _ in range(trials)]
        scores = [r["score_gbps"] for r in results if "score_gbps" in r]
        errors = [r["error"] for r in results if "error" in r]
        row = {"env": dict(env), "scores_gbps": scores, "median_gbps": statistics.median(scores) if scores else None}
        if errors:
            row["errors"] = errors
        rows.append(row)
        if not scores and not env:  # the baseline failed: nothing can be compared
            code = next((r.get("exit_code") for r in results if r.get("exit_code") in (3, 4)), 1)
            raise SweepError(errors[0] if errors else "the baseline trial reported nothing", code)
        return row["median_gbps"]

    baseline = best_score = measure({})
    best: dict[str, str] = {}
    for knob in knobs:
        scored = [(measure({**best, knob["name"]: value}), value) for value in knob["values"]]
        scored = [(s, v) for s, v in scored if s is not None]
        if scored:
            score, value = max(scored, key=lambda sv: sv[0])
            if score > best_score * (1 + min_gain):
                best[knob["name"]], best_score = value, score
    return {"best": best, "baseline_gbps": baseline, "best_gbps": best_score, "rows": rows,
            "min_gain": min_gain, "trials": trials}


def nccl_conf_text(result: dict, host: str) -> str:
    # NCCL reads KEY=VALUE lines: the comment lines carry no "=".
    lines = [f"# Proposed by bench/nccl_sweep.py on {host} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"# all_reduce busbw {result['baseline_gbps']:.4g} GB/s with NCCL defaults, {result['best_gbps']:.4g}"
             f" GB/s with the settings below ({len(result['rows'])} settings tried, {result['trials']} trial(s)"
             f" each, kept only when {result['min_gain']:.0%} better)"]
    if not result["best"]:
        lines.append("# No setting beat NCCL's defaults: nothing to set")
    lines += [f"{key}={value}" for key, value in result["best"].items()]
    return "\n".join(lines) + "\n"


def write_proposal(out: Path, result: dict, host: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"nccl_conf": out / "nccl.conf", "overrides": out / "nccl_overrides.json", "sweep": out / "nccl_sweep.json"}
    paths["nccl_conf"].write_text(nccl_conf_text(result, host))
    paths["overrides"].write_text(json.dumps({"aidc_nccl_overrides": result["best"]}, indent=2) + "\n")
    paths["sweep"].write_text(json.dumps(result, indent=2) + "\n")
    return paths


def sweep(out: Path, knobs_file: Path = KNOBS_FILE, trial_args: list[str] | None = None,
          trials: int | None = None, timeout_s: float = 120.0, budget_s: float = 360.0) -> tuple[dict, dict[str, Path]]:
    knobs = load_knobs(knobs_file)
    swept = [k["name"] for k in knobs["knobs"]]
    result = coordinate_sweep(knobs["knobs"], lambda env: run_trial(env, swept, trial_args or [], timeout_s),
                              trials or knobs["trials"], knobs["min_gain"], time.monotonic() + budget_s)
    return result, write_proposal(out, result, os.uname().nodename)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "./out")
    parser.add_argument("--knobs", default=str(KNOBS_FILE))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--max-bytes", type=int, default=256 << 20)
    parser.add_argument("--budget", type=float, default=360.0, help="seconds after which no new setting is tried")
    args = parser.parse_args()
    try:
        result, paths = sweep(Path(args.out), Path(args.knobs), ["--max-bytes", str(args.max_bytes)], args.trials,
                              budget_s=args.budget)
    except SweepError as exc:
        print(f"nccl_sweep: {exc}; nothing proposed", file=sys.stderr)
        return exc.code
    print(paths["nccl_conf"].read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
