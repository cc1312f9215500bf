#!/usr/bin/env python3
"""Full compression benchmark; prints the issue-6 target ratios side by side with fp32.

    nice -n 10 .venv/bin/python bench/compress_bench.py [--quick] [--out DIR] [--audit-db PATH]

Every figure comes from one run on this machine: fp32 and each variant are timed in the
same process, threads pinned (reported). Other work on the machine slows both; the fp32
baseline is timed before and after the variants and the faster figure kept.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))

from aidc.compress.config import BenchConfig  # noqa: E402


def row(model: dict, technique: str, sparsity: float | None = None) -> dict | None:
    for r in model["rows"]:
        if r["technique"] == technique and (sparsity is None or r["settings"].get("sparsity") == sparsity):
            return r
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=".aidc/compress")
    ap.add_argument("--audit-db", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from aidc.compress import report
    from aidc.compress.runner import run_bench

    def progress(what: str, done: int, total: int) -> None:
        print(f"[{done:3d}/{total}] {what}", file=sys.stderr, flush=True)

    results = run_bench(BenchConfig(quick=args.quick, threads=args.threads), progress=progress)
    paths = report.write_outputs(results, args.out)
    if args.audit_db:
        report.audit_results(results, args.audit_db)
    print(report.text_report(results))
    print()
    models = {m["model"]: m for m in results["models"]}
    mini, digits = models["minilm-l6"], models["digits-mlp"]
    base_m, base_d = mini["rows"][0], digits["rows"][0]
    dyn = row(mini, "int8-dynamic")
    sp = row(digits, "prune-structured", 0.5)
    st = row(digits, "distill")
    print(f"side by side (threads={results['threads']}, {results['cpu_capability']}, load avg "
          f"{os.getloadavg()[0]:.1f} at the end):")
    lines = [
        ("MiniLM int8 dynamic: linear-layer bytes", base_m["linear_bytes"], dyn["linear_bytes"],
         f"{dyn['linear_ratio']:.2f}x smaller", ">= 3.5x"),
        ("MiniLM int8 dynamic: batch-32 ms (paired)", dyn["baseline_batch_ms"], dyn["batch_ms"],
         f"{dyn['speedup_tp']:.2f}x faster", "> 1.0x"),
        ("MiniLM int8 dynamic: mean cosine to fp32", 1.0, dyn["quality"]["cosine_mean"],
         f"top-1 agreement {dyn['quality']['top1_agreement']:.2f}", ">= 0.99"),
        ("digits structured 50%: batch-256 ms (paired)", sp["baseline_batch_ms"], sp["batch_ms"],
         f"{sp['speedup_tp']:.2f}x faster", ">= 1.5x"),
        ("digits structured 50%: accuracy %", base_d["quality_value"], sp["quality_value"],
         f"{sp['quality_delta']:+.2f} pt", "within 1 pt"),
        ("digits distilled student: params", base_d["params"], st["params"], f"{st['param_ratio']:.3f} of teacher", "<= 0.25"),
        ("digits distilled student: accuracy %", base_d["quality_value"], st["quality_value"],
         f"{st['quality_delta']:+.2f} pt", "within 2 pt"),
    ]
    print("  (paired: fp32 and the variant timed alternately in the same window)")
    print(f"  {'measure':44s} {'fp32':>12s} {'variant':>12s}  {'ratio':24s} target")
    for name, a, b, ratio, target in lines:
        print(f"  {name:44s} {a:>12,.4g} {b:>12,.4g}  {ratio:24s} {target}")
    for t in results["targets"]:
        print(f"  target {t['id']}: {'met' if t['met'] else 'NOT met'}")
    print("wrote " + ", ".join(paths.values()))
    return 0 if all(t["met"] for t in results["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
