"""Data-loader advisor: how many DataLoader workers, and how far ahead each prefetches, so that
the training step never waits for input.

The prefetch model (issue #11, "cache = sum of stream rate x transfer time / prefetch time"):
while one batch is fetched, the step keeps consuming, so the data already in the cache must
cover every transfer in progress (Little's law). For each input stream s (a training process
reading its shard; `streams` of them share a node):

    rate_s      bytes per second the step consumes  = batch bytes / step time
    transfer_s  seconds one worker needs to read and decode one batch
    prefetch    seconds one prefetched batch lasts  = the step time

    cache (bytes)   = sum_s rate_s x transfer_s
    cache (batches) = sum_s rate_s x transfer_s / (rate_s x prefetch) = sum_s transfer_s / step_s

A worker turns out one batch per transfer time, so a stream needs ceil(transfer / step)
workers to keep up; they are capped by the cores this process may use, less the share the
training steps themselves take (beyond that, more workers only queue for a core). Each worker keeps `prefetch_factor` batches queued: enough for
the stream's share of the cache, stretched by the measured jitter of the transfer time (p90 /
median, at most 4), never fewer than torch's default of 2 nor more than 16.

The figures are measured here on real files, after one read of every file (so every figure
meets the same warm page cache): the dataset's read rate (bytes and files per second), the
decode time per sample, the transfer time of a batch through a DataLoader in this process
(collation included), and the training step's consumption (the lab model's forward, backward
and update on an in-memory batch). `before_after` then trains the lab model
from a real torch DataLoader over the dataset, with torch's defaults and with the advice, and
reports both measured step times.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from aidc.errors import AidcError
from aidc.files import SHARED_MODE, write_atomic

SAMPLE_SUFFIX = ".sample"
MAGIC = b"AIDCSMP1"
MAX_WORKERS = 64
MAX_PREFETCH_FACTOR = 16  # batches queued per worker: past this it is memory, not smoothing
MAX_JITTER = 4.0  # a p90/median beyond this is the machine's load, not the storage's


class DatasetError(AidcError):
    pass


# -- the lab dataset: real files, each one compressed sample ------------------------------------

def make_dataset(directory: str | Path, samples: int, sample_kib: int = 64, seed: int = 0) -> dict:
    """Write `samples` files of about `sample_kib` KiB of zlib-compressed float32 data each (like an
    encoded image: reading one costs I/O and a decode). Returns what was written."""
    import torch

    if not 1 <= samples <= 1_000_000:
        raise DatasetError(f"--samples must be 1..1000000, got {samples}")
    if not 1 <= sample_kib <= 65536:
        raise DatasetError(f"--sample-kib must be 1..65536, got {sample_kib}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    floats = sample_kib * 1024 // 4
    total = 0
    for i in range(samples):
        # Smooth random data compresses like natural images do (some, not all).
        values = torch.cumsum(torch.randn(floats, generator=g), 0).to(torch.float32)
        blob = MAGIC + zlib.compress(values.numpy().tobytes(), 6)
        write_atomic(directory / f"{i:07d}{SAMPLE_SUFFIX}", blob, SHARED_MODE)
        total += len(blob)
    return {"dataset": str(directory), "samples": samples, "bytes": total, "sample_kib": sample_kib}


def sample_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.exists():
        raise DatasetError(f"dataset directory {directory} does not exist "
                           f"(make a lab one with `aidc tune make-dataset --dataset {directory}`)")
    if not directory.is_dir():
        raise DatasetError(f"dataset path {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.name.endswith(SAMPLE_SUFFIX) and p.is_file())
    if not files:
        raise DatasetError(f"dataset directory {directory} holds no *{SAMPLE_SUFFIX} files "
                           f"(make a lab one with `aidc tune make-dataset --dataset {directory}`)")
    return files


def decode(path: Path, features: int):
    """One sample: the file read and decompressed, pooled to the model's input features, and a target."""
    import torch

    blob = path.read_bytes()
    if not blob.startswith(MAGIC):
        raise DatasetError(f"{path} is not an aidc lab sample (bad header)")
    try:
        raw = zlib.decompress(blob[len(MAGIC):])
    except zlib.error as exc:
        raise DatasetError(f"{path} is corrupt: {exc}") from None
    values = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    usable = values.numel() // features * features
    if usable == 0:
        raise DatasetError(f"{path} holds fewer than {features} values")
    x = values[:usable].view(features, -1).mean(dim=1)
    x = (x - x.mean()) / (x.std() + 1e-6)
    return x, torch.sin(x[:1] * 3) + 0.5 * x[1:2] ** 2


class FileDataset:
    """A map-style dataset over the sample files (what torch's DataLoader indexes)."""

    def __init__(self, files: list[Path], features: int):
        self.files, self.features = files, features

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return decode(self.files[index], self.features)


# -- measuring --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    files: int
    mean_file_bytes: float
    read_mb_s: float  # reading the files (bytes off storage or page cache), one thread
    files_per_s: float
    sample_s: float  # read + decode of one sample, one worker (median)
    batch_load_s: float  # one batch through a DataLoader in this process (median): the transfer time
    batch_load_s_p90: float
    step_s: float  # the training step on an in-memory batch (median)
    batch_size: int

    @property
    def transfer_s(self) -> float:
        return self.batch_load_s

    @property
    def consume_mb_s(self) -> float:
        return self.batch_size * self.mean_file_bytes / self.step_s / 1e6

    def to_dict(self) -> dict:
        return {**asdict(self), "transfer_s": self.transfer_s, "consume_mb_s": self.consume_mb_s}


def warm(files: list[Path]) -> int:
    """Read every file once, so every measurement below meets the same (warm) page cache."""
    return sum(len(p.read_bytes()) for p in files)


def measure(files: list[Path], batch_size: int, *, probe_files: int = 256, probe_batches: int = 8,
            step_repeats: int = 20) -> Measured:
    """The dataset's read rate and decode time, a batch's transfer time through a DataLoader
    (collation included), and the training step's consumption."""
    import torch
    from torch.utils.data import DataLoader

    from aidc.lab.trainer import IN_FEATURES

    probe = files[:probe_files]
    started = time.perf_counter()
    nbytes = sum(len(p.read_bytes()) for p in probe)
    read_s = max(time.perf_counter() - started, 1e-9)
    per_sample = []
    for p in probe:
        t0 = time.perf_counter()
        decode(p, IN_FEATURES)
        per_sample.append(time.perf_counter() - t0)
    batches = []
    loader = DataLoader(FileDataset(files, IN_FEATURES), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(1))
    last = time.perf_counter()
    for _ in loader:
        now = time.perf_counter()
        batches.append(now - last)
        last = now
        if len(batches) >= probe_batches:
            break
    batches.sort()
    x = torch.randn(batch_size, IN_FEATURES)
    y = torch.randn(batch_size, 1)
    model = _model()
    times = []
    for _ in range(step_repeats + 3):
        t0 = time.perf_counter()
        _train_step(model, x, y)
        times.append(time.perf_counter() - t0)
    return Measured(len(files), nbytes / len(probe), nbytes / read_s / 1e6, len(probe) / read_s,
                    statistics.median(per_sample), statistics.median(batches),
                    batches[int(0.9 * (len(batches) - 1))], statistics.median(times[3:]), batch_size)


def _model():
    from aidc.lab.trainer import build_model

    return build_model(0)


def _train_step(model, x, y, lr: float = 0.01) -> float:
    """The lab trainer's step without the collective: forward, backward, plain SGD."""
    import torch

    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None
    return float(loss.detach())


# -- the model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Advice:
    num_workers: int
    prefetch_factor: int
    cache_batches: float  # sum over streams of transfer / step: batches that must be in flight
    cache_bytes: float  # sum over streams of rate x transfer
    workers_needed: int  # per stream, uncapped
    cores: int
    streams: int
    input_bound: bool  # even the capped workers cannot keep up: the step will wait for input
    expected_step_s: float
    jitter: float

    def to_dict(self) -> dict:
        return asdict(self)


def advise(m: Measured, streams: int = 1, cores: int | None = None) -> Advice:
    """The prefetch model above, applied to the measured figures."""
    if streams < 1:
        raise DatasetError(f"--streams must be at least 1, got {streams}")
    cores = cores or len(os.sched_getaffinity(0))
    per_stream = m.transfer_s / m.step_s
    cache_batches = streams * per_stream
    rate = m.batch_size * m.mean_file_bytes / m.step_s
    cache_bytes = streams * rate * m.transfer_s
    needed = max(1, math.ceil(per_stream))
    # Each training process keeps the share of a core its step needs once input flows at full
    # speed (a 2 ms step fed every 8 ms leaves three quarters of its core to decoding); the
    # rest of the cores can decode.
    busy = streams * min(1.0, m.step_s / max(m.step_s, m.transfer_s / cores))
    spare = max(1, round((cores - busy) / streams))
    workers = min(needed, spare, MAX_WORKERS)
    jitter = min(m.batch_load_s_p90 / m.batch_load_s, MAX_JITTER) if m.batch_load_s > 0 else 1.0
    prefetch = min(max(2, math.ceil(per_stream * jitter / workers)), MAX_PREFETCH_FACTOR)
    expected = max(m.step_s, m.transfer_s / workers)
    return Advice(workers, prefetch, cache_batches, cache_bytes, needed, cores, streams, workers < needed,
                  expected, jitter)


# -- before and after, on a real DataLoader ----------------------------------------------------------

def loader_step_time(files: list[Path], batch_size: int, steps: int, num_workers: int,
                     prefetch_factor: int | None, warmup: int = 3, timeout_s: float = 120.0) -> dict:
    """Train the lab model from a torch DataLoader over the files; the median time per step,
    waiting for input included, after `warmup` steps (workers starting)."""
    import torch
    from torch.utils.data import DataLoader

    from aidc.lab.trainer import IN_FEATURES

    kwargs = {"num_workers": num_workers, "batch_size": batch_size, "shuffle": True, "drop_last": True,
              "generator": torch.Generator().manual_seed(0)}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=True, timeout=timeout_s)
    loader = DataLoader(FileDataset(files, IN_FEATURES), **kwargs)
    model = _model()
    times, waits = [], []
    done = 0
    deadline = time.monotonic() + timeout_s
    while done < steps + warmup:
        it = iter(loader)
        last = time.perf_counter()
        for x, y in it:
            got = time.perf_counter()
            _train_step(model, x, y)
            now = time.perf_counter()
            if done >= warmup:
                times.append(now - last)
                waits.append(got - last)
            last, done = now, done + 1
            if done >= steps + warmup or time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            break
        if len(files) < batch_size:
            raise DatasetError(f"{len(files)} sample files make no batch of {batch_size}")
    del loader
    if not times:
        raise DatasetError(f"no step finished within {timeout_s:.0f} s")
    return {"num_workers": num_workers, "prefetch_factor": prefetch_factor, "steps": len(times),
            "step_s": statistics.median(times), "input_wait_s": statistics.median(waits)}


def before_after(files: list[Path], batch_size: int, steps: int, advice: Advice, rounds: int = 2) -> dict:
    """torch's defaults (no workers) and the advice, alternated `rounds` times so that a change
    of load on the machine hits both alike; each side's median over its rounds."""
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(rounds):
        runs["before"].append(loader_step_time(files, batch_size, steps, 0, None))
        runs["after"].append(loader_step_time(files, batch_size, steps, advice.num_workers, advice.prefetch_factor))
    out = {}
    for side, results in runs.items():
        out[side] = {**results[0], "step_s": statistics.median(r["step_s"] for r in results),
                     "input_wait_s": statistics.median(r["input_wait_s"] for r in results),
                     "rounds_step_s": [r["step_s"] for r in results]}
    out["speedup"] = out["before"]["step_s"] / out["after"]["step_s"]
    return out
