"""Harness overhead: the burn-in's GEMM and all_reduce code against bare loops of the same sizes.

In one run, interleaved (harness then bare, then bare then harness, ...) for `--repeats`
rounds:
  GEMM        GemmBench.sample() (the burn-in's timed sample: `matmuls_per_sample` matmuls)
              against `for _ in range(k): torch.matmul(a, b)` with the same k, size and dtype;
  all_reduce  collective_sweep("all_reduce") (the burn-in's sweep) against a bare
              `dist.all_reduce(buf)` loop with the same sizes, iterations and warm-up, each
              timed between a barrier and the last call and taken at the slowest rank, as the
              harness does.
ratio = bare time / harness time (the harness's throughput as a fraction of the bare loop's),
the median over pairs taken back to back (the machine's load changes from second to second;
a pair sees the same load); GEMM on the thread CPU clock the harness itself uses on simulated
GPUs (wall clock beside it), all_reduce on the wall clock. Goal >= 0.95 each. Both use one
compute thread, as a lab node does.

  .venv/bin/python bench/burnin_overhead.py [--ranks 2] [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))

GOAL = 0.95


def _paired(harness, bare, repeats: int) -> list[tuple]:
    """`repeats` (harness, bare) results taken back to back, alternating which goes first: on a
    shared machine the load changes from second to second, and each pair sees the same load."""
    pairs = []
    for rep in range(repeats):
        if rep % 2 == 0:
            h = harness()
            b = bare()
        else:
            b = bare()
            h = harness()
        pairs.append((h, b))
    return pairs


def gemm_overhead(dtype: str, size: int, repeats: int, target_sample_s: float) -> dict:
    import torch

    from aidc.burnin.gemm import DTYPES, GemmBench

    bench = GemmBench("cpu", dtype, size, target_sample_s=target_sample_s)
    k = bench.per_sample
    gen = torch.Generator().manual_seed(1234)  # the operands GemmBench uses
    a = torch.randn(size, size, generator=gen).to(DTYPES[dtype])
    b = torch.randn(size, size, generator=gen).to(DTYPES[dtype])
    torch.matmul(a, b)  # warm-up, as GemmBench's constructor did for the harness

    def timed(fn) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        return time.perf_counter() - w0, time.thread_time() - c0

    def bare_loop():
        for _ in range(k):
            torch.matmul(a, b)

    pairs = _paired(lambda: timed(bench.sample), lambda: timed(bare_loop), repeats)
    wall = [b[0] / h[0] for h, b in pairs]
    cpu = [b[1] / h[1] for h, b in pairs]
    bare_cpu = statistics.median(b[1] for _, b in pairs)
    return {"dtype": dtype, "size": size, "matmuls_per_sample": k,
            "harness_cpu_s": statistics.median(h[1] for h, _ in pairs), "bare_cpu_s": bare_cpu,
            "harness_wall_s": statistics.median(h[0] for h, _ in pairs),
            "bare_wall_s": statistics.median(b[0] for _, b in pairs),
            # On simulated GPUs the harness times with the thread's CPU clock (aidc.burnin.timing):
            # the ratio on that clock is the one its figures carry; wall time is reported beside it.
            "ratio": statistics.median(cpu), "wall_ratio": statistics.median(wall),
            "harness_reported_tflops": bench.result().tflops, "harness_clock": bench.clock_name,
            "bare_tflops": 2 * size**3 * k / bare_cpu / 1e12}


def _bare_allreduce(nbytes: int, iters: int, warmup: int) -> float:
    """The loop anyone would write: seconds per all_reduce at the slowest rank."""
    import torch
    import torch.distributed as dist

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    for _ in range(warmup):
        dist.all_reduce(buf)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _allreduce_rank(rank: int, world: int, store: str, sizes: list[int], repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from aidc.burnin.collectives import collective_sweep, iterations_for

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    pairs = {}
    for nbytes in sizes:  # one size at a time, so each pair is taken back to back
        iters = iterations_for(nbytes)
        # The burn-in's sweep code on this one size (its first size: two warm-up calls), and the bare
        # loop with the same warm-up and iterations; every rank runs the same sequence.
        pairs[nbytes] = _paired(lambda: collective_sweep("all_reduce", "cpu", [nbytes])[0].time_us / 1e6,
                                lambda: _bare_allreduce(nbytes, iters, warmup=2), repeats)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"iterations": [iterations_for(s) for s in sizes],
                                         "pairs": [pairs[s] for s in sizes]}))


def allreduce_overhead(ranks: int, sizes: list[int], repeats: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="aidc-overhead-") as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_allreduce_rank, args=(ranks, os.path.join(tmp, "store"), sizes, repeats, out), nprocs=ranks)
        raw = json.loads(Path(out).read_text())
    rows, every_ratio = [], []
    for nbytes, iters, pairs in zip(sizes, raw["iterations"], raw["pairs"]):
        ratios = [b / h for h, b in pairs]
        every_ratio += ratios
        rows.append({"bytes": nbytes, "iterations": iters, "harness_us": statistics.median(h for h, _ in pairs) * 1e6,
                     "bare_us": statistics.median(b for _, b in pairs) * 1e6, "ratio": statistics.median(ratios)})
    return {"ranks": ranks, "backend": "gloo", "sizes": rows, "ratio": statistics.median(every_ratio)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemm-size", type=int, default=256, help="default: the lab stack's gemm_size")
    parser.add_argument("--target-sample-s", type=float, default=0.02, help="the burn-in's default")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--min-bytes", type=int, default=4096)
    parser.add_argument("--max-bytes", type=int, default=4 << 20, help="default: the lab stack's sweep")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.ranks < 2 or args.repeats < 1 or args.gemm_size < 16:
        print("burnin_overhead: error: --ranks must be >= 2, --repeats >= 1, --gemm-size >= 16", file=sys.stderr)
        return 2
    import torch

    from aidc.burnin.collectives import sweep_sizes

    torch.set_num_threads(1)
    started = time.monotonic()
    doc = {"goal": GOAL, "repeats": args.repeats, "load_before": os.getloadavg()[0],
           "gemm": {d: gemm_overhead(d, args.gemm_size, args.repeats, args.target_sample_s) for d in ("fp32", "bf16")},
           "all_reduce": allreduce_overhead(args.ranks, sweep_sizes(args.min_bytes, args.max_bytes), args.repeats)}
    ratios = {f"gemm_{d}": g["ratio"] for d, g in doc["gemm"].items()} | {"all_reduce": doc["all_reduce"]["ratio"]}
    doc.update(ratios=ratios, meets_goal=all(r >= GOAL for r in ratios.values()), load_after=os.getloadavg()[0],
               duration_s=round(time.monotonic() - started, 1))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for d, g in doc["gemm"].items():
        print(f"GEMM {d} {g['size']}^2 x {g['matmuls_per_sample']}/sample: CPU time harness {g['harness_cpu_s'] * 1e3:.2f} ms,"
              f" bare {g['bare_cpu_s'] * 1e3:.2f} ms, ratio {g['ratio']:.3f} (wall-clock ratio {g['wall_ratio']:.3f})")
    for r in doc["all_reduce"]["sizes"]:
        print(f"all_reduce {r['bytes']:>8} B x {r['iterations']:>2}, {args.ranks} ranks: harness {r['harness_us']:9.0f} us,"
              f" bare {r['bare_us']:9.0f} us, ratio {r['ratio']:.3f}")
    print(f"all_reduce, every size and repeat: median paired ratio {doc['all_reduce']['ratio']:.3f}")
    print(", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + f"; goal >= {GOAL}: "
          + ("met" if doc["meets_goal"] else "NOT met") + f" (load {doc['load_before']:.1f} -> {doc['load_after']:.1f},"
          f" {doc['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
