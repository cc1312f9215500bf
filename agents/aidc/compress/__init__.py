"""Compression benchmarks: pruning, quantization, distillation and fusion on real models.

`run_bench(BenchConfig(...))` measures each technique against the dense fp32 baseline on the
models in `aidc.compress.cases`; `aidc.compress.report` turns the results into a table, a
Pareto plot, JSON and an HTML section. Heavy imports (torch, transformers) happen in the
modules below, not here, so importing this package stays cheap.
"""

from aidc.compress.config import BenchConfig, TECHNIQUES, MODELS

__all__ = ["BenchConfig", "TECHNIQUES", "MODELS", "run_bench"]


def run_bench(config: BenchConfig, progress=None):
    from aidc.compress.runner import run_bench as _run

    return _run(config, progress=progress)
