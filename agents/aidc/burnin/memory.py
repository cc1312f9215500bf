"""Memory-copy bandwidth on one device, in GB/s (1e9 bytes/s).

Counted like a device-to-device copy in CUDA's bandwidthTest: every pass reads the
buffer once and writes it once, so bytes moved = 2 x buffer size.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from aidc.burnin.timing import device_clock, sync

COUNTING = "read+write (2 x bytes per copy, like a device-to-device copy)"


@dataclass(frozen=True)
class MemcpyResult:
    nbytes: int
    gbps: float  # 2 * nbytes / median time / 1e9
    median_s: float
    copies_per_sample: int
    samples: int
    counting: str = COUNTING
    clock: str = "wall"  # what the times measure (see aidc.burnin.timing)

    def to_dict(self) -> dict:
        return asdict(self)


class MemcpyBench:
    """Copy timing, one sample at a time (the runner interleaves nodes' samples)."""

    def __init__(self, device: str, nbytes: int, copies_per_sample: int = 4):
        self.device, self.nbytes, self.copies = device, nbytes, copies_per_sample
        self.src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # warm-up: page in both buffers
        sync(device)
        self.clock_name, self.clock = device_clock(device)
        self.times: list[float] = []

    def sample(self) -> float:
        sync(self.device)
        t0 = self.clock()
        for _ in range(self.copies):
            self.dst.copy_(self.src)
        sync(self.device)
        self.times.append(max(self.clock() - t0, 1e-9))
        return self.times[-1]

    def result(self) -> MemcpyResult:
        if not self.times:
            raise ValueError("no samples taken")
        # A copy that silently corrupts data is not a bandwidth: check the result once.
        if not bool(torch.equal(self.dst, self.src)):
            raise RuntimeError(f"memory copy on {self.device} produced wrong data")
        median = statistics.median(self.times)
        return MemcpyResult(self.nbytes, 2.0 * self.nbytes * self.copies / median / 1e9, median,
                            self.copies, len(self.times), clock=self.clock_name)


def measure_memcpy(device: str, nbytes: int, repeats: int = 5, copies_per_sample: int = 4) -> MemcpyResult:
    bench = MemcpyBench(device, nbytes, copies_per_sample)
    for _ in range(repeats):
        bench.sample()
    return bench.result()
