"""`aidc tune`: settings measured on this machine (the data loader's workers and prefetch)."""

from __future__ import annotations

from pathlib import Path

import typer

from aidc.cli.options import VocabularyGroup

from aidc.cli.output import JSON_OPTION, emit

app = typer.Typer(cls=VocabularyGroup, help="Advice measured on this machine: DataLoader workers and prefetch.", no_args_is_help=True)

DATASET = typer.Option(Path(".aidc/lab/datasets"), "--dataset",
                       help="Directory of sample files (*.sample); the lab's is .aidc/lab/datasets.")


@app.command("make-dataset")
def make_dataset(dataset: Path = DATASET,
                 samples: int = typer.Option(2048, "--samples", help="How many sample files (1..1000000)."),
                 sample_kib: int = typer.Option(64, "--sample-kib", help="Uncompressed KiB per sample (1..65536)."),
                 as_json: bool = JSON_OPTION) -> None:
    """Write a lab dataset: one zlib-compressed sample per file (reading one costs I/O and a decode)."""
    from aidc.tune.prefetch import make_dataset as make

    made = make(dataset, samples, sample_kib)
    emit(made, as_json, f"{made['samples']} samples, {made['bytes'] / 1e6:.1f} MB in {made['dataset']}")


@app.command("prefetch")
def prefetch(dataset: Path = DATASET,
             batch_size: int = typer.Option(64, "--batch-size", min=1, max=65536, help="Samples per batch."),
             streams: int = typer.Option(1, "--streams", min=1, max=64,
                                         help="Training processes on this node reading their own stream."),
             steps: int = typer.Option(30, "--steps", min=1, max=100000,
                                       help="Measured steps of the before/after training run."),
             no_compare: bool = typer.Option(False, "--no-compare",
                                             help="Only advise; skip training before and after applying it."),
             as_json: bool = JSON_OPTION) -> None:
    """Measure the dataset's read rate and the step's consumption; recommend num_workers and
    prefetch_factor (cache = sum of stream rate x transfer time / prefetch time); then train from
    a real DataLoader with torch's defaults and with the advice, and report both step times."""
    from aidc.tune.prefetch import advise, before_after, measure, sample_files, warm

    files = sample_files(dataset)  # bad input: one clear error before any work (and before torch)
    if len(files) < batch_size:
        raise typer.BadParameter(f"{dataset} holds {len(files)} sample files, fewer than one batch of {batch_size}",
                                 param_hint="--batch-size")
    import torch

    torch.set_num_threads(1)  # one compute thread per training process, as in the lab
    warm(files)
    measured = measure(files, batch_size)
    advice = advise(measured, streams)
    result = {"dataset": str(dataset), "measured": measured.to_dict(), "advice": advice.to_dict(),
              "model": "cache (batches) = sum over streams of rate x transfer / (rate x prefetch time) "
                       "= sum of transfer / step; workers = ceil(transfer / step) per stream, capped by cores"}
    if not no_compare:
        result["compare"] = before_after(files, batch_size, steps, advice)
    emit(result, as_json, _text(result))


def _text(r: dict) -> str:
    m, a = r["measured"], r["advice"]
    lines = [f"dataset {r['dataset']}: {m['files']} files, {m['mean_file_bytes'] / 1024:.0f} KiB each, read "
             f"{m['read_mb_s']:.0f} MB/s ({m['files_per_s']:.0f} files/s, page cache warm); read+decode "
             f"{m['sample_s'] * 1000:.2f} ms per sample",
             f"training step {m['step_s'] * 1000:.2f} ms per batch of {m['batch_size']}: consumes "
             f"{m['consume_mb_s']:.1f} MB/s; one worker needs {m['transfer_s'] * 1000:.1f} ms per batch",
             f"cache: {a['cache_batches']:.1f} batches ({a['cache_bytes'] / 1e6:.1f} MB) in flight over "
             f"{a['streams']} stream(s)",
             f"advice: num_workers={a['num_workers']} prefetch_factor={a['prefetch_factor']}"
             + (f" (input-bound: {a['workers_needed']} workers needed, {a['cores']} cores)" if a["input_bound"] else "")]
    if "compare" in r:
        c = r["compare"]
        lines.append(f"measured step: {c['before']['step_s'] * 1000:.1f} ms with num_workers=0 -> "
                     f"{c['after']['step_s'] * 1000:.1f} ms with the advice ({c['speedup']:.2f}x)")
    return "\n".join(lines)
