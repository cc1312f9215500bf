"""GEMM throughput on one device, in TFLOP/s.

A simulated GPU can be told to compute N times slower (`compute_slowdown()`). That must
be real: the node does N times the arithmetic for each nominal matmul (whole extra
matmuls, plus one narrower matmul for a fractional part), so everything timed on it,
here and in training, sees a slow device, and the figure is measured, never scaled.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import asdict, dataclass

import torch

from aidc.burnin.timing import device_clock, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GemmResult:
    dtype: str
    size: int
    tflops: float  # nominal FLOPs (2 n^3 per matmul) / median time
    median_s: float  # median time of one timed sample
    matmuls_per_sample: int  # nominal matmuls per timed sample
    samples: int
    slowdown: float
    work_factor: float  # FLOPs executed / nominal FLOPs (== slowdown)
    matmuls_executed: int  # every torch.matmul call, warm-up included (behavioural evidence)
    clock: str = "wall"  # what the times measure (see aidc.burnin.timing)
    # The bench checks its answers, not only its speed: sha256 of the product after the last
    # sample (the seeded operands are the same on every GPU), and whether it is bit-identical
    # to the product after warm-up (a GPU whose answers drift under load is not stable).
    result_digest: str = ""
    results_stable: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def result_digest(t: torch.Tensor) -> str:
    """sha256 of a result's bytes: two GPUs agree only when every bit of every element does."""
    return hashlib.sha256(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def seeded_operands(device: str, dtype: torch.dtype, size: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two n x n operands on every GPU of every run (generated on the CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    return a, b


class SlowedMatmul:
    """One nominal n x n matmul, executed `slowdown` times over in real arithmetic."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, slowdown: float):
        if slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1.0, got {slowdown}")
        n = a.shape[0]
        self.a, self.b, self.out = a, b, torch.empty_like(a)
        self.whole = int(math.floor(slowdown))
        # The fractional part: an (n x k) @ (k x n) matmul costs 2 n^2 k FLOPs = frac * 2 n^3.
        k = round((slowdown - self.whole) * n)
        self.frac_a, self.frac_b = (a[:, :k], b[:k, :]) if k > 0 else (None, None)
        self.frac_out = torch.empty_like(a) if k > 0 else None
        self.work_factor = self.whole + (k / n)
        self.calls = 0

    def __call__(self) -> None:
        for _ in range(self.whole):
            torch.matmul(self.a, self.b, out=self.out)
            self.calls += 1
        if self.frac_a is not None:
            torch.matmul(self.frac_a, self.frac_b, out=self.frac_out)
            self.calls += 1


class GemmBench:
    """GEMM timing, one sample at a time, so the runner can interleave nodes' samples.

    Warm-up and calibration happen here: each sample runs enough matmuls to last about
    `target_sample_s`, so small matrices are not timed at the resolution of the clock.
    """

    def __init__(self, device: str, dtype: str, size: int, slowdown: float = 1.0,
                 target_sample_s: float = 0.02, max_per_sample: int = 256):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.device, self.dtype, self.size, self.slowdown = device, dtype, size, slowdown
        self.step = SlowedMatmul(*seeded_operands(device, DTYPES[dtype], size), slowdown)
        self.clock_name, self.clock = device_clock(device)
        self.step()  # warm-up: allocations, kernel selection
        sync(device)
        self.first_result = self.step.out.clone()
        t0 = self.clock()
        self.step()
        sync(device)
        one = max(self.clock() - t0, 1e-9)
        self.per_sample = max(1, min(max_per_sample, math.ceil(target_sample_s / one)))
        self.times: list[float] = []

    def sample(self) -> float:
        sync(self.device)
        t0 = self.clock()
        for _ in range(self.per_sample):
            self.step()
        sync(self.device)
        self.times.append(max(self.clock() - t0, 1e-9))
        return self.times[-1]

    def result(self) -> GemmResult:
        if not self.times:
            raise ValueError("no samples taken")
        median = statistics.median(self.times)
        tflops = 2.0 * self.size**3 * self.per_sample / median / 1e12
        out = self.step.out
        digest = result_digest(out)
        return GemmResult(self.dtype, self.size, tflops, median, self.per_sample, len(self.times),
                          self.slowdown, self.step.work_factor, self.step.calls, self.clock_name, digest,
                          bool(torch.equal(out, self.first_result)))


def measure_gemm(device: str, dtype: str, size: int, repeats: int = 5, slowdown: float = 1.0,
                 target_sample_s: float = 0.02) -> GemmResult:
    """Median GEMM throughput of `repeats` timed samples after warm-up."""
    bench = GemmBench(device, dtype, size, slowdown, target_sample_s)
    for _ in range(repeats):
        bench.sample()
    return bench.result()
