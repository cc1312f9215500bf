"""How device work is timed.

On a GPU: wall time between two synchronisations (the kernels' elapsed time). On the
lab's simulated GPUs the "device" is the calling CPU thread (one compute thread per
node), so its busy time is that thread's CPU time: wall time on a shared machine would
also count the time the thread waits for a core, and other processes' load would then
read as a slow node. Work a slowed node really does still costs it CPU time.
"""

from __future__ import annotations

import time
from typing import Callable


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def device_clock(device: str) -> tuple[str, Callable[[], float]]:
    """(name, clock) for timing work on `device`."""
    if device.startswith("cuda"):
        return "wall", time.perf_counter
    return "thread_cpu", time.thread_time
