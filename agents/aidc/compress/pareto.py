"""Non-dominated points: lower cost and higher quality are better."""

from __future__ import annotations


def non_dominated(points: list[tuple[float, float]]) -> list[bool]:
    """For each (cost, quality), True when no other point is at least as good in both and better in one."""
    flags = []
    for i, (ci, qi) in enumerate(points):
        dominated = any(cj <= ci and qj >= qi and (cj < ci or qj > qi)
                        for j, (cj, qj) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags
