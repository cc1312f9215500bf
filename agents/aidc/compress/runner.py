"""Runs every requested technique on every requested model and measures it against fp32."""

from __future__ import annotations

import copy
import datetime as dt
import platform
import time
from collections.abc import Callable
from importlib import resources

import torch
import yaml

from aidc.compress import distillation, fusion, pruning, quantization
from aidc.compress.config import TECHNIQUES, BenchConfig
from aidc.compress.measure import count_params, linear_bytes, median_seconds, model_bytes
from aidc.compress.pareto import non_dominated
from aidc.compress.variant import Variant
from aidc.errors import CompressError

Progress = Callable[[str, int, int], None]  # (what is running, steps done, steps in all)


def build_case(name: str, config: BenchConfig):
    from aidc.compress.cases import DigitsCase, MiniLMCase

    if name == "digits-mlp":
        return DigitsCase(epochs=10 if config.quick else 30, seed=config.seed)
    if name == "minilm-l6":
        return MiniLMCase(tuning_size=64 if config.quick else 160, seed=config.seed)
    raise CompressError(f"unknown model {name!r}")


def finetune_steps(case, quick: bool) -> int:
    if case.name == "minilm-l6":
        return 8 if quick else 40
    if case.name.startswith("digits"):
        return 3 if quick else 8
    return 2  # tiny test cases


def make_variants(case, technique: str, config: BenchConfig) -> list[Variant]:
    """The compressed models of one technique (one per sparsity for pruning)."""
    base, steps = case.model, finetune_steps(case, config.quick)
    if technique == "prune-unstructured":
        return [pruning.magnitude_prune(case, base, s, steps) for s in config.chosen_sparsities()]
    if technique == "prune-structured":
        return [pruning.structured_prune(case, base, s, steps) for s in config.chosen_sparsities()]
    if technique == "int8-dynamic":
        return [quantization.int8_dynamic(case, base)]
    if technique == "int8-static":
        return [quantization.int8_static(case, base)]
    if technique in ("fp16", "bf16"):
        return [quantization.half_precision(case, base, technique)]
    if technique == "int8-weight-only":
        return [quantization.torchao_int8(case, base, dynamic_activations=False)]
    if technique == "int8-dynamic-torchao":
        return [quantization.torchao_int8(case, base, dynamic_activations=True)]
    if technique == "distill":
        return [distillation.distill(case, base)]
    if technique in ("fusion-average", "fusion-ensemble"):
        return fusion.fusion_variants(case, base, steps=2 if config.quick else 4, wanted=(technique,))
    raise CompressError(f"unknown technique {technique!r}; valid: {', '.join(TECHNIQUES)}")


def applicable(case, technique: str) -> str | None:
    """None when the technique runs on this model, else the reason it is skipped."""
    if isinstance(case.model, torch.nn.Sequential):
        return None
    if technique == "distill":
        return ("implemented for the MLP classifier only: half of MiniLM's weights are its vocabulary "
                "embedding, so a student at 1/4 of the parameters needs a new, smaller vocabulary")
    if technique in ("fusion-average", "fusion-ensemble"):
        return ("implemented for the MLP classifier only: MiniLM has no labelled task here to make "
                "several distinct fine-tunes from")
    return None


def _timed(case, model, batch, max_repeats: int, budget_s: float) -> float:
    """Median seconds of one forward; fewer repeats for slow models so a run stays bounded."""
    once = median_seconds(lambda: case.forward(model, batch), repeats=1, warmup=1)
    repeats = max(3, min(max_repeats, int(budget_s / max(once, 1e-6))))
    return median_seconds(lambda: case.forward(model, batch), repeats=repeats, warmup=0)


def _paired(case, model, reference, batch, max_repeats: int, budget_s: float) -> tuple[float, float]:
    """Median seconds of model and of reference, timed alternately so both see the same load.

    Other processes share this machine's cores; timing the baseline once and every variant
    later would turn changes in their load into speed-ups or slow-downs."""
    import statistics
    import time as _time

    def once(m) -> float:
        start = _time.perf_counter()
        case.forward(m, batch)
        return _time.perf_counter() - start

    with torch.inference_mode():
        once(model), once(reference)  # warm-up
        first = once(model) + once(reference)
        pairs = max(3, min(max_repeats, int(budget_s / max(first, 1e-6))))
        mine, theirs = [], []
        for _ in range(pairs):
            mine.append(once(model))
            theirs.append(once(reference))
    return statistics.median(mine), statistics.median(theirs)


def time_variant(case, model, config: BenchConfig, reference=None) -> dict:
    budget = 0.5 if config.quick else 3.0
    b1 = _timed(case, model, case.batch(1), config.chosen_repeats(), budget / 2)
    tp_batch = case.throughput_batch
    batch = case.batch(tp_batch)
    if reference is None:
        bt = _timed(case, model, batch, config.chosen_repeats(), budget)
        paired = {}
    else:
        bt, ref = _paired(case, model, reference, batch, config.chosen_repeats(), budget)
        paired = {"baseline_batch_ms": round(ref * 1e3, 3)}
    return {"latency_b1_ms": round(b1 * 1e3, 3), "batch_ms": round(bt * 1e3, 3), "throughput_batch": tp_batch,
            "throughput_per_s": round(tp_batch / bt, 1), **paired}


def measure(case, variant: Variant, config: BenchConfig, baseline: Variant | None = None) -> dict:
    quality = case.evaluate(variant.model)
    return {
        "technique": variant.technique, "label": variant.label, "family": variant.family,
        "settings": variant.params, "note": variant.note,
        "params": count_params(variant.model),
        "disk_bytes": model_bytes(variant.model, variant.to_disk),
        "linear_bytes": linear_bytes(variant.model, variant.to_disk),
        **time_variant(case, variant.model, config, baseline.model if baseline else None),
        "quality": quality, "quality_value": quality[case.quality_key],
    }


def retime_baseline(case, baseline: Variant, row: dict, config: BenchConfig) -> None:
    """Time fp32 at batch 1 again after the variants and keep the faster figure (batch-1 latency
    is not paired; a slow first measurement would otherwise flatter every technique)."""
    again = time_variant(case, baseline.model, config)
    row["latency_b1_ms"] = min(row["latency_b1_ms"], again["latency_b1_ms"])
    if again["batch_ms"] < row["batch_ms"]:
        row["batch_ms"], row["throughput_per_s"] = again["batch_ms"], again["throughput_per_s"]


def add_ratios(rows: list[dict], quality_unit: str) -> None:
    base = rows[0]
    for r in rows:
        r["size_ratio"] = round(base["disk_bytes"] / r["disk_bytes"], 3)
        r["linear_ratio"] = round(base["linear_bytes"] / r["linear_bytes"], 3) if r["linear_bytes"] else None
        r["param_ratio"] = round(r["params"] / base["params"], 4)
        r["speedup_b1"] = round(base["latency_b1_ms"] / r["latency_b1_ms"], 3)
        # at the throughput batch each variant was timed alternately with fp32 (paired)
        r["speedup_tp"] = round(r.get("baseline_batch_ms", base["batch_ms"]) / r["batch_ms"], 3)
        r["quality_delta"] = round(r["quality_value"] - base["quality_value"], 5)
        r["quality_drop"] = round(-r["quality_delta"], 5)
    for r in rows:  # latency on fp32's clock: the paired ratio applied to fp32's own figure
        r["batch_ms_normalised"] = round(base["batch_ms"] / r["speedup_tp"], 3)
    for axis, key in (("latency", "batch_ms_normalised"), ("size", "disk_bytes")):
        flags = non_dominated([(r[key], r["quality_value"]) for r in rows])
        for r, flag in zip(rows, flags):
            r[f"pareto_{axis}"] = flag


def recommend(model: dict, tolerance: float, unit: str) -> str:
    rows = model["rows"]
    ok = [r for r in rows[1:] if r["quality_drop"] <= tolerance and (r["pareto_latency"] or r["pareto_size"])
          and r["speedup_tp"] >= 1.0 and r["size_ratio"] >= 1.0]
    if not ok:
        return f"{model['model']}: keep dense fp32 (no technique was both no worse in cost and within tolerance)"
    best = max(ok, key=lambda r: r["speedup_tp"] * r["size_ratio"])
    delta = (f"{best['quality_delta']:+.1f} pt" if unit == "pt"
             else f"{model['quality_key']} {best['quality_value']:.3f}")
    return (f"{model['model']}: {best['label']}: {best['size_ratio']:.1f}x smaller, "
            f"{best['speedup_tp']:.1f}x faster at batch {best['throughput_batch']}, {delta}")


def load_targets() -> list[dict]:
    text = resources.files("aidc.data").joinpath("compress/targets.yaml").read_text()
    return yaml.safe_load(text)["targets"]


def _lookup(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        value = value[part]
    return value


def check_targets(models: list[dict]) -> list[dict]:
    out = []
    by_name = {m["model"]: m for m in models}
    for target in load_targets():
        model = by_name.get(target["model"])
        rows = [r for r in (model["rows"] if model else []) if r["technique"] == target["technique"]
                and ("sparsity" not in target or r["settings"].get("sparsity") == target["sparsity"])]
        if not rows:
            out.append({"id": target["id"], "measured": None, "met": None})
            continue
        measured, met = {}, True
        for key, rule in target["checks"].items():
            v = _lookup(rows[0], key)
            measured[key] = v
            met &= (v >= rule.get("min", float("-inf")) and v <= rule.get("max", float("inf"))
                    and v > rule.get("min_exclusive", float("-inf")))
        out.append({"id": target["id"], "measured": measured, "met": bool(met)})
    return out


def plan(config: BenchConfig) -> int:
    per_model = 2 + sum(len(config.chosen_sparsities()) if t.startswith("prune") else 1
                        for t in config.chosen_techniques())
    return per_model * len(config.models)


def run_bench(config: BenchConfig, progress: Progress | None = None, cases: dict | None = None) -> dict:
    """Measure everything; `cases` lets tests pass ready-made (tiny) models by name."""
    progress = progress or (lambda *_: None)
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    total, done = plan(config), 0
    models = []
    for name in config.models:
        progress(f"{name}: loading", done, total)
        case = (cases or {}).get(name) or build_case(name, config)
        done += 1
        progress(f"{name}: dense fp32", done, total)
        baseline = Variant("fp32", "dense fp32", "baseline", copy.deepcopy(case.model).eval())
        rows, skipped = [measure(case, baseline, config)], []
        done += 1
        for technique in config.chosen_techniques():
            steps = len(config.chosen_sparsities()) if technique.startswith("prune") else 1
            reason = applicable(case, technique)
            if reason:
                skipped.append({"technique": technique, "reason": reason})
                done += steps
                continue
            progress(f"{name}: {TECHNIQUES[technique][1]}", done, total)
            try:
                variants = make_variants(case, technique, config)
            except CompressError:
                raise
            except Exception as exc:  # a broken backend is a finding to report, not a crash
                skipped.append({"technique": technique, "reason": f"failed: {type(exc).__name__}: {exc}"[:300]})
                done += steps
                continue
            for v in variants:
                rows.append(measure(case, v, config, baseline))
                done += 1
                progress(f"{name}: {v.label}", done, total)
        retime_baseline(case, baseline, rows[0], config)
        add_ratios(rows, case.quality_unit)
        entry = {"model": name, "quality_key": case.quality_key, "quality_unit": case.quality_unit,
                 "quality_tolerance": case.quality_tolerance, "rows": rows, "skipped": skipped}
        entry["recommendation"] = recommend(entry, case.quality_tolerance, case.quality_unit)
        models.append(entry)
    progress("done", total, total)
    return {
        "started": started.isoformat(timespec="seconds"), "duration_s": round(time.monotonic() - t0, 1),
        "quick": config.quick, "threads": torch.get_num_threads(), "seed": config.seed,
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(), "models": models, "targets": check_targets(models),
    }
