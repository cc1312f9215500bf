"""One NCCL trial for bench/nccl_sweep.py: all_reduce and all_gather busbw across this host's GPUs,
with whatever NCCL_* environment this process was started with (NCCL reads it at init, so
every setting needs a fresh process).

Prints one JSON object on stdout: `env` (the NCCL_* variables it saw), `rows` per collective
(nccl-tests' bytes/algbw/busbw), `score_gbps` (all_reduce busbw at the largest size) or
`error`. Exit 0 measured, 1 a rank failed, 3 no CUDA device, 4 fewer than two GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

NO_CUDA, TOO_FEW_GPUS = 3, 4


def _rank(rank: int, world: int, store_path: str, sizes: list[int], out: str, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    from aidc.burnin.collectives import collective_sweep

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        rows = {op: [r.to_dict() for r in collective_sweep(op, f"cuda:{rank}", sizes)]
                for op in ("all_reduce", "all_gather")}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=256 << 20)
    parser.add_argument("--min-bytes", type=int, default=None, help="default: max / 8 (four sizes)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for NCCL to set up and run")
    args = parser.parse_args()
    doc: dict = {"env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}}

    def done(code: int, error: str | None = None) -> int:
        if error:
            doc["error"] = error
        print(json.dumps(doc))
        return code

    try:
        import torch
        import torch.multiprocessing as mp
    except ImportError:
        return done(NO_CUDA, f"torch is not installed for {sys.executable}")
    if not torch.cuda.is_available():
        return done(NO_CUDA, f"torch {torch.__version__} sees no CUDA device: NCCL cannot be measured here")
    world = torch.cuda.device_count()
    doc["gpus"] = world
    if world < 2:
        return done(TOO_FEW_GPUS, "one GPU: NCCL moves nothing between GPUs with one rank (busbw is 0),"
                                  " so its settings cannot be compared here")
    from aidc.burnin.collectives import sweep_sizes

    sizes = sweep_sizes(args.min_bytes or max(4, args.max_bytes // 8), args.max_bytes)
    if not sizes:
        return done(2, f"no power of two between {args.min_bytes} and {args.max_bytes} bytes")
    with tempfile.TemporaryDirectory(prefix="nccl-trial-") as tmp:
        out = os.path.join(tmp, "rows.json")
        try:
            mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), sizes, out, args.timeout), nprocs=world)
        except Exception as exc:  # a setting NCCL refuses, or a rank that failed: that trial has no figure
            return done(1, f"{type(exc).__name__}: {str(exc)[-500:]}")
        doc["rows"] = json.loads(Path(out).read_text())
    doc["score_gbps"] = doc["rows"]["all_reduce"][-1]["busbw_gbps"]
    return done(0)


if __name__ == "__main__":
    sys.exit(main())
