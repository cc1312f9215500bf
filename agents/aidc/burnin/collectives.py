"""Collectives over a size sweep, reported with nccl-tests' definitions.

algbw = S / time; busbw = algbw * factor, the factor that makes the figure comparable to
one rank's link rate whatever the rank count (nccl-tests, doc/PERFORMANCE.md):
all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast 1.
S is what nccl-tests calls the size: the whole buffer for all_reduce and broadcast; the
whole gathered output for all_gather (n x the per-rank input); the whole input for
reduce_scatter (n x the per-rank output); a rank's whole send buffer for all_to_all
(n chunks, one per peer). Per-rank counts are S / (4 n) floats rounded down, so the
reported S can be a little below the sweep's power of two, as nccl-tests prints it.

Units are GB/s (1e9 bytes/s), as nccl-tests prints them; link rates are in Gb/s (bits).
Every collective is followed by a correctness check with rank-distinct values.
"""

from __future__ import annotations

import statistics
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

# The collectives burn-in measures, in the order it runs them.
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def algbw_gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def busbw_gbps(nbytes: int, seconds: float, ranks: int, op: str = "all_reduce") -> float:
    return algbw_gbps(nbytes, seconds) * BUS_FACTORS[op](ranks)


def metric_name(op: str) -> str:
    """The node metric holding `op`'s busbw (`node_busbw`): allreduce_busbw_gbps, ..."""
    return op.replace("_", "") + "_busbw_gbps"


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
class CollectiveRow:
    op: str
    bytes: int  # nccl-tests' S for this op (see the module docstring)
    iterations: int
    time_us: float  # the slowest rank's mean time per operation
    algbw_gbps: float
    busbw_gbps: float
    own_time_us: float  # this rank's median time per operation (on GPUs its mean)
    own_busbw_gbps: float  # busbw from this rank's own time (what the fleet comparison uses)
    correct: bool  # the check with rank-distinct values held on this rank

    def to_dict(self) -> dict:
        return asdict(self)


# Kept for callers that name the all_reduce row type.
AllreduceRow = CollectiveRow


def _fns():
    import torch.distributed as dist

    # torch 2.13 renamed the tensor forms; older releases have only the old names.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return dist, gather, scatter


class _Op:
    """One collective at one size: buffers, the timed call, and the correctness check."""

    def __init__(self, op: str, nbytes: int, device: str):
        import torch

        dist, self.gather, self.scatter = _fns()
        self.op, self.n, self.rank = op, dist.get_world_size(), dist.get_rank()
        n, f32 = self.n, torch.float32
        self.calls = 0
        if op in ("all_reduce", "broadcast"):
            self.count = max(1, nbytes // 4)
            self.nbytes = self.count * 4
            self.buf = torch.ones(self.count, dtype=f32, device=device)
        else:  # per-rank chunk of S / n
            self.count = max(1, nbytes // 4 // n)
            self.nbytes = self.count * n * 4
            small = torch.ones(self.count, dtype=f32, device=device)
            large = torch.ones(self.count * n, dtype=f32, device=device)
            self.inp, self.out = {"all_gather": (small, large), "reduce_scatter": (large, small),
                                  "all_to_all": (large, torch.empty_like(large))}[op]
        self.dist, self.device = dist, device

    def __call__(self) -> None:
        dist, op = self.dist, self.op
        if op == "all_reduce":
            dist.all_reduce(self.buf)
        elif op == "broadcast":  # the root rotates, so every rank's send path is timed alike
            dist.broadcast(self.buf, src=self.calls % self.n)
        elif op == "all_gather":
            self.gather(self.out, self.inp)
        elif op == "reduce_scatter":
            self.scatter(self.out, self.inp)
        else:
            dist.all_to_all_single(self.out, self.inp)
        self.calls += 1

    def check(self) -> bool:
        import torch

        n, rank, c = self.n, self.rank, self.count
        chunks = torch.arange(n, dtype=torch.float32, device=self.device).repeat_interleave(c)
        if self.op == "all_reduce":
            self.buf.fill_(rank + 1)
            self.dist.all_reduce(self.buf)
            expected = torch.full_like(self.buf, n * (n + 1) / 2)
            got = self.buf
        elif self.op == "broadcast":
            root = n - 1  # not rank 0: a rank that ignores src would still pass with root 0
            self.buf.fill_(root + 1 if rank == root else 0)
            self.dist.broadcast(self.buf, src=root)
            expected, got = torch.full_like(self.buf, root + 1), self.buf
        elif self.op == "all_gather":
            self.inp.fill_(rank + 1)
            self.gather(self.out, self.inp)
            expected, got = chunks + 1, self.out
        elif self.op == "reduce_scatter":  # chunk j of rank r holds (r+1)(j+1): rank j gets (j+1) n(n+1)/2
            self.inp.copy_(chunks + 1).mul_(rank + 1)
            self.scatter(self.out, self.inp)
            expected, got = torch.full_like(self.out, (rank + 1) * n * (n + 1) / 2), self.out
        else:  # chunk j of rank r holds r n + j: rank r receives j n + r from rank j
            self.inp.copy_(rank * n + chunks)
            self.dist.all_to_all_single(self.out, self.inp)
            expected, got = chunks * n + rank, self.out
        return bool(torch.equal(got, expected))


def collective_sweep(op: str, device: str, sizes: list[int], on_size: Callable[[int], None] | None = None,
                     warmup: int = 2) -> list[CollectiveRow]:
    """Run on every rank of the default process group; time, slowest-rank time and a check per size."""
    import torch
    import torch.distributed as dist

    if op not in COLLECTIVES:
        raise ValueError(f"collective must be one of {', '.join(COLLECTIVES)}, not {op!r}")
    n = dist.get_world_size()
    on_gpu = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    rows = []
    for index, nbytes in enumerate(sizes):
        call = _Op(op, nbytes, device)
        # The first size also pays for connection set-up; later sizes need one call to touch buffers.
        for _ in range(warmup if index == 0 else 1):
            call()
        iters = iterations_for(call.nbytes)
        if op == "broadcast":  # every rank is root equally often: a receiver's wait depends on where the root is
            iters = -(-iters // n) * n
        sync()
        dist.barrier()
        t0 = lap = time.perf_counter()
        laps = []
        for _ in range(iters):
            sent_as_root = op == "broadcast" and call.calls % n == call.rank
            call()
            if not on_gpu:  # a CPU collective returns when done: each call can be timed alone
                now = time.perf_counter()
                if not sent_as_root:  # a root returns once its data left: not comparable with receiving
                    laps.append(now - lap)
                lap = now
        sync()
        mean = (time.perf_counter() - t0) / iters
        # This rank's own figure: the median call, so one moment descheduled on a shared machine
        # does not decide it (GPU calls are asynchronous: there, the loop's mean). For broadcast,
        # the calls where this rank received.
        own = statistics.median(laps) if laps else mean
        elapsed = torch.tensor([mean], dtype=torch.float64, device=device)
        # The collective is as slow as its slowest rank: report that time on every rank.
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = float(elapsed.item())
        rows.append(CollectiveRow(op, call.nbytes, iters, seconds * 1e6, algbw_gbps(call.nbytes, seconds),
                                  busbw_gbps(call.nbytes, seconds, n, op), own * 1e6,
                                  busbw_gbps(call.nbytes, own, n, op), call.check()))
        if on_size:
            on_size(nbytes)
    return rows


def allreduce_sweep(device: str, sizes: list[int], on_size: Callable[[int], None] | None = None,
                    warmup: int = 2) -> list[CollectiveRow]:
    return collective_sweep("all_reduce", device, sizes, on_size, warmup)


def node_busbw(rows: list[dict], largest: int = 3) -> float:
    """A node's busbw figure: bus bytes moved over the sweep's `largest` sizes / the time it took
    (the time-weighted mean of their busbw). Several sizes, not only the last: on a shared
    machine one descheduled moment at the end of a short timed loop would otherwise decide."""
    top = rows[-largest:]
    seconds = sum(r["time_us"] * r["iterations"] for r in top)
    return sum(r["busbw_gbps"] * r["time_us"] * r["iterations"] for r in top) / seconds


def with_link_fraction(rows: list[dict], link_rate_gbps: float, own: bool = False) -> list[dict]:
    """Report rows (`bytes`, `algbw_gbps`, `busbw_gbps`, `link_fraction`, ...) against a link
    rate in GB/s. `own`: the figures from this rank's own time instead of the slowest rank's."""
    out = []
    for r in rows:
        row = {"bytes": r["bytes"], "iterations": r["iterations"], "correct": r["correct"]}
        if own:
            seconds = r["own_time_us"] / 1e6
            row.update(time_us=r["own_time_us"], algbw_gbps=algbw_gbps(r["bytes"], seconds),
                       busbw_gbps=r["own_busbw_gbps"])
        else:
            row.update(time_us=r["time_us"], algbw_gbps=r["algbw_gbps"], busbw_gbps=r["busbw_gbps"])
        row["link_fraction"] = row["busbw_gbps"] / link_rate_gbps
        # More than one link carries (busbw is scaled to compare with it): a measurement or
        # link-rate error, flagged so that no reader takes it for a result.
        row["above_link_rate"] = row["link_fraction"] > 1
        out.append(row)
    return out
