#!/usr/bin/env python3
"""Training stall per checkpoint, synchronous vs asynchronous, in the same run.

One process trains the lab's model (aidc.lab.trainer's model and batches; optionally wider)
and checkpoints after every step, encrypted under a fresh keyring, alternating blocks of
synchronous saves (`CheckpointDir.save`: encrypt, write, rename before the next step) and
asynchronous ones (`BackgroundCheckpointWriter`: snapshot, then the same save on a thread).
The stall is the time from the end of a step's update to the start of the next step.

    .venv/bin/python bench/checkpoint_stall.py [--hidden 2048] [--checkpoints 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=384, help="hidden width (the lab's is 384)")
    p.add_argument("--checkpoints", type=int, default=30, help="checkpoints per mode")
    p.add_argument("--block", type=int, default=5, help="checkpoints per block before switching mode")
    p.add_argument("--fsync", action="store_true", help="fsync each checkpoint (the lab does not)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch
    from torch import nn

    from aidc.checkpoint import BackgroundCheckpointWriter, CheckpointDir
    from aidc.kms.local import LocalKeyring
    from aidc.lab import trainer

    torch.set_num_threads(1)
    trainer.HIDDEN = args.hidden
    model = trainer.build_model(1)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    work = Path(tempfile.mkdtemp(prefix="aidc-ckpt-stall-"))
    ckpt = CheckpointDir(work / "ckpt", job="bench", kms=LocalKeyring.create(work / "keyring", "bench"), keep=2,
                         fsync=args.fsync)
    writes: list[float] = []
    writer = BackgroundCheckpointWriter(ckpt, on_durable=lambda step, write_s: writes.append(write_s))
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    steps: dict[str, list[float]] = {"sync": [], "async": []}
    step = 0
    for block in range(2 * args.checkpoints // args.block):
        mode = "sync" if block % 2 == 0 else "async"
        for _ in range(args.block):
            step += 1
            t0 = time.perf_counter()
            x, y = trainer.batch(1, step, 0)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            with torch.no_grad():
                for param in model.parameters():
                    param -= 0.05 * param.grad
                    param.grad = None
            t1 = time.perf_counter()
            state = {"step": step, "model": model.state_dict()}
            if mode == "sync":
                ckpt.save(step, state)
            else:
                writer.save(step, state)
            stalls[mode].append(time.perf_counter() - t1)
            steps[mode].append(t1 - t0)
        writer.wait()  # the next block starts with no write in flight
    out = {
        "state_mib": round(size / 2**20, 2), "hidden": args.hidden, "checkpoints_per_mode": args.checkpoints,
        "sync_stall_ms_p50": round(statistics.median(stalls["sync"]) * 1000, 3),
        "async_stall_ms_p50": round(statistics.median(stalls["async"]) * 1000, 3),
        "async_write_ms_p50": round(statistics.median(writes) * 1000, 3),
        "step_ms_p50_sync_blocks": round(statistics.median(steps["sync"]) * 1000, 3),
        "step_ms_p50_async_blocks": round(statistics.median(steps["async"]) * 1000, 3),
        "load_average": round(os.getloadavg()[0], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out["stall_ratio_async_over_sync"] = round(out["async_stall_ms_p50"] / out["sync_stall_ms_p50"], 4)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"state {out['state_mib']} MiB: stall per checkpoint p50 sync {out['sync_stall_ms_p50']} ms, "
              f"async {out['async_stall_ms_p50']} ms (ratio {out['stall_ratio_async_over_sync']}); background "
              f"write p50 {out['async_write_ms_p50']} ms; step p50 {out['step_ms_p50_sync_blocks']} ms (sync blocks) "
              f"vs {out['step_ms_p50_async_blocks']} ms (async blocks); load {out['load_average']}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
