"""Soak (`aidc burnin run --soak-s N`): hold GEMM load on every GPU of a node for N seconds and
record SM clock, throttle reasons, temperature and power at evenly spaced samples.

A GPU that keeps its clocks for a 20 ms sample may still throttle after minutes of heat: the
verdict compares the SM clock it held late in the soak (median of the second half of the
samples) with the clock it reached early (the best of the first quarter); a GPU whose clock
sagged by more than `policy.burnin.soak_max_clock_sag` fails, named, with the figures and the
throttle reasons the driver gave. This module needs no torch: the load is the caller's
(one nominal GEMM of the node's bench per call).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

MIN_SAMPLES = 4  # fewer cannot tell an early clock from a late one
MAX_SAMPLES = 120  # per GPU, whatever the duration: the series goes into the certificate


def sample_count(seconds: float) -> int:
    """About one sample a second, within [2 x MIN_SAMPLES, MAX_SAMPLES]."""
    return min(MAX_SAMPLES, max(2 * MIN_SAMPLES, round(seconds)))


def soak(dev, load: dict[int, Callable[[], None]], seconds: float, samples: int,
         sync: Callable[[], None] = lambda: None) -> dict[int, list[dict]]:
    """{gpu index: [{"t", "sm_clock_mhz", "temperature_c", "power_w", "throttle_reasons"}]}.

    `load[i]()` issues one unit of work on GPU i; between two samples every GPU gets at least one
    unit and the load goes on until the next sample is due. `sync` waits for queued GPU work.
    """
    if not seconds > 0 or samples < 2:
        raise ValueError(f"a soak needs a positive duration and at least 2 samples, got {seconds} s, {samples}")
    interval = seconds / samples
    recorded: dict[int, list[dict]] = {i: [] for i in load}
    start = time.monotonic()
    for k in range(samples):
        for i in load:
            t = dev.telemetry(i)
            recorded[i].append({"t": round(time.monotonic() - start, 3), "sm_clock_mhz": t.sm_clock_mhz,
                                "temperature_c": t.temperature_c, "power_w": t.power_w,
                                "throttle_reasons": list(t.throttle_reasons)})
        due = start + (k + 1) * interval
        while True:  # bounded: at most until the next sample is due, after one unit each
            for step in load.values():
                step()
            sync()
            if time.monotonic() >= due:
                break
    return recorded


def judge_soak(series: dict[int, list[dict]], max_sag: float) -> tuple[list[str], list[str], list[int]]:
    """(reasons, notes, failed GPU indices) of one node's soak."""
    reasons, notes, failed = [], [], []
    for index, samples in sorted(series.items()):
        if len(samples) < MIN_SAMPLES:
            notes.append(f"GPU {index}: soak too short to judge clocks ({len(samples)} samples, need {MIN_SAMPLES})")
            continue
        clocks = [s["sm_clock_mhz"] for s in samples]
        early = max(clocks[:max(1, len(clocks) // 4)])
        late = statistics.median(clocks[len(clocks) // 2:])
        sag = 1 - late / early if early > 0 else 0.0
        throttled = sorted({r for s in samples[len(samples) // 2:] for r in s["throttle_reasons"]})
        if sag > max_sag:
            reasons.append(f"GPU {index}: SM clock sagged {sag:.0%} under sustained load ({early:.0f} MHz early,"
                           f" {late:.0f} MHz late; tolerance {max_sag:.0%}); throttle reasons:"
                           f" {', '.join(throttled) or 'none reported'}; peak"
                           f" {max(s['temperature_c'] for s in samples):.0f} C")
            failed.append(index)
        elif throttled:  # throttled from the start: no sag to see, but not to be passed over in silence
            notes.append(f"GPU {index}: clock steady in the soak ({late:.0f} MHz) but throttled:"
                         f" {', '.join(throttled)}")
    return reasons, notes, failed
