"""`aidc compress`: what pruning, quantization, distillation and fusion buy on this machine."""

from __future__ import annotations

from pathlib import Path

import typer

from aidc.cli.options import VocabularyGroup

from aidc.cli.output import JSON_OPTION, emit

app = typer.Typer(cls=VocabularyGroup, help="Compression benchmarks on real models (pruning, quantization, distillation, fusion).",
                  no_args_is_help=True)


@app.command("bench")
def bench(
    quick: bool = typer.Option(False, "--quick", help="Fewer sparsities, repeats and fine-tune steps (< 3 min on 2 idle cores)."),
    model: list[str] = typer.Option([], "--model", help="Only this model (repeatable): digits-mlp, minilm-l6."),
    technique: list[str] = typer.Option([], "--technique", help="Only this technique (repeatable); default all."),
    sparsity: list[float] = typer.Option([], "--sparsity", help="Pruning sparsity in (0, 1) (repeatable)."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch intra-op threads (pinned, reported)."),
    out: Path = typer.Option(None, "--out", help="Directory for results.json, Pareto PNGs and compress-report.html."),
    audit_db: Path = typer.Option(None, "--audit-db", help="Append one compress.result record per model here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure every technique against dense fp32: size, latency, throughput, quality."""
    from aidc.compress.config import MODELS, BenchConfig

    config = BenchConfig(quick=quick, models=tuple(model) or MODELS, techniques=tuple(technique),
                         sparsities=tuple(sparsity), threads=threads)  # validates: bad input -> CompressError
    import warnings

    # torch 2.13 warns on every quantized-tensor creation that the API is deprecated; the
    # reason the benchmark still uses it is in aidc/compress/quantization.py.
    warnings.filterwarnings("ignore", message=".*quantize_per.*")
    from aidc.compress import report
    from aidc.compress.runner import run_bench

    results = _run_with_progress(config, run_bench)
    if out is not None:
        results["outputs"] = report.write_outputs(results, out)
    if audit_db is not None:
        results["audit_seqs"] = report.audit_results(results, audit_db)
    text = report.text_report(results)
    if out is not None:
        text += "\n\nwrote " + ", ".join(results["outputs"].values())
    emit(results, as_json, text)


def _run_with_progress(config, run_bench) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<48}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=not console.is_terminal) as bar:
        task = bar.add_task("compress bench", total=1)

        def on_step(what: str, done: int, total: int) -> None:
            bar.update(task, description=what[:48], completed=done, total=total)

        return run_bench(config, progress=on_step)
