"""all_reduce over a size sweep, reported with nccl-tests' definitions.

algbw = bytes / time; busbw = algbw * 2(n-1)/n for all_reduce (the factor that makes
the figure comparable to the link rate whatever the rank count). Units are GB/s
(1e9 bytes/s), as nccl-tests prints them; link rates are in Gb/s (bits). All three are
reported, because mixing them up is a common complaint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

BUS_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}


def algbw_gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def busbw_gbps(nbytes: int, seconds: float, ranks: int, op: str = "all_reduce") -> float:
    return algbw_gbps(nbytes, seconds) * BUS_FACTORS[op](ranks)


def sweep_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Powers of two from min to max inclusive (min rounded up to a multiple of 4 bytes)."""
    size = max(4, 1 << (max(min_bytes, 4) - 1).bit_length())
    out = []
    while size <= max_bytes:
        out.append(size)
        size *= 2
    return out


def iterations_for(nbytes: int, budget_bytes: int = 16 * 1024 * 1024, lo: int = 3, hi: int = 10) -> int:
    # Small messages are latency-bound and cheap: time more of them; large ones fewer.
    return max(lo, min(hi, budget_bytes // max(nbytes, 1)))


@dataclass(frozen=True)
class AllreduceRow:
    nbytes: int
    iterations: int
    time_us: float  # slowest rank's mean time per all_reduce
    algbw_gbps: float
    busbw_gbps: float
    correct: bool  # a fill-with-(rank+1) all_reduce summed to n(n+1)/2 everywhere on this rank

    def to_dict(self) -> dict:
        return asdict(self)


def allreduce_sweep(device: str, sizes: list[int], on_size: Callable[[int], None] | None = None,
                    warmup: int = 2) -> list[AllreduceRow]:
    """Run on every rank of the default process group; returns the same timings on each."""
    import torch
    import torch.distributed as dist

    n, rank = dist.get_world_size(), dist.get_rank()
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    rows = []
    for nbytes in sizes:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(buf)
        iters = iterations_for(nbytes)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        sync()
        elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
        # The collective is as slow as its slowest rank: report that time on every rank.
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = float(elapsed.item())
        buf.fill_(rank + 1)
        dist.all_reduce(buf)
        correct = bool(torch.all(buf == n * (n + 1) / 2).item())
        rows.append(AllreduceRow(nbytes, iters, seconds * 1e6, algbw_gbps(nbytes, seconds),
                                 busbw_gbps(nbytes, seconds, n), correct))
        if on_size:
            on_size(nbytes)
    return rows
