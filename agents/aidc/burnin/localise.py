"""Localise a bad link: which node, which rail, how slow, in O(N) pair tests.

A fleet collective is as slow as its slowest link, so it cannot say whose link is bad.
Pair tests can: on each rail, every node runs a 2-rank all_reduce with its ring
neighbour (N tests for N nodes; a 2-rank all_reduce moves, per rank, its buffer out and
in once, so busbw = algbw and compares directly with the link rate). A node with a bad
rail slows both of its pairs; its neighbours each appear in one slow pair only. A slow
pair that shares no node with another slow pair (two nodes, or a ring of two) is split
by testing each of its nodes against a node from a fast pair (two more tests: the
bisection). N + 2 per isolated slow pair, never N².

A pair is slow when its busbw fraction of the link rate is more than `tolerance` below
the rail's fleet median: the median over nodes of each node's best ring pair (fleet-
relative, like the rest of burn-in). A uniformly slow fabric has no single culprit and
is left to the fleet floor.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

# (rail, rank a, rank b) -> busbw as a fraction of the link rate (0.0: the test failed)
Measure = Callable[[int, int, int], float]


@dataclass
class PairTest:
    rail: int
    a: int
    b: int
    fraction: float
    purpose: str  # "ring" or "bisect"


@dataclass
class Culprit:
    node: int
    rail: int
    fraction: float  # the node's best slow pair: its link is at most this fast
    fleet_median: float  # the rail's median over nodes of each node's best ring pair

    def reason(self, names: list[str]) -> str:
        return (f"{names[self.node]} rail {self.rail}: busbw {self.fraction:.0%} of link rate"
                f" (fleet median {self.fleet_median:.0%})")


@dataclass
class Localisation:
    nodes: int
    rails: int
    tolerance: float
    tests: list[PairTest] = field(default_factory=list)
    culprits: list[Culprit] = field(default_factory=list)
    unresolved: list[dict] = field(default_factory=list)  # slow pairs no test could pin on one end

    @property
    def pair_tests(self) -> int:
        return len(self.tests)

    def to_dict(self, names: list[str]) -> dict:
        return {
            "pair_tests": self.pair_tests, "nodes": self.nodes, "rails": self.rails, "tolerance": self.tolerance,
            "tests": [{**asdict(t), "a": names[t.a], "b": names[t.b]} for t in self.tests],
            "culprits": [{"node": names[c.node], "rail": c.rail, "fraction": round(c.fraction, 4),
                          "fleet_median": round(c.fleet_median, 4), "reason": c.reason(names)} for c in self.culprits],
            "unresolved": [{"rail": u["rail"], "a": names[u["a"]], "b": names[u["b"]],
                            "note": f"rail {u['rail']}: pair {names[u['a']]}-{names[u['b']]} was slow"
                                    f" ({u['fraction']:.0%} of link rate) but {u['why']}"} for u in self.unresolved],
        }


def ring_pairs(n: int) -> list[tuple[int, int]]:
    """Each node with its ring successor: n pairs (one for two nodes, none for one)."""
    if n < 2:
        return []
    if n == 2:
        return [(0, 1)]
    return [(i, (i + 1) % n) for i in range(n)]


def localise(n: int, rails: int, measure: Measure, tolerance: float) -> Localisation:
    """Find the nodes whose rail is slow. `measure` runs (or looks up) one pair test."""
    out = Localisation(n, rails, tolerance)

    def run(rail: int, a: int, b: int, purpose: str) -> float:
        value = measure(rail, a, b)
        out.tests.append(PairTest(rail, a, b, value, purpose))
        return value

    for rail in range(rails):
        ring = {(a, b): run(rail, a, b, "ring") for a, b in ring_pairs(n)}
        if not ring:
            continue
        # The reference is the median node's best pair: a node with a good link has at least
        # one fast pair, so one bad node cannot drag it down even in a ring of three.
        best = [max(v for pair, v in ring.items() if x in pair) for x in range(n)]
        median = statistics.median(best)
        cut = median * (1 - tolerance)
        slow = [pair for pair, value in ring.items() if value < cut]
        fast_nodes = sorted({x for pair, value in ring.items() if value >= cut for x in pair})
        count = {x: sum(x in pair for pair in slow) for x in range(n)}
        named: dict[int, float] = {}
        for pair in slow:
            doubly = [x for x in pair if count[x] >= 2]
            for x in doubly:  # in two slow pairs: its own link is slow
                named[x] = max(named.get(x, 0.0), ring[pair])
            if doubly:
                continue
            references = [x for x in fast_nodes if x not in pair and count[x] == 0]
            if not references:
                out.unresolved.append({"rail": rail, "a": pair[0], "b": pair[1], "fraction": ring[pair],
                                       "why": "no healthy node is left to test its ends against"})
                continue
            ref = references[0]
            split = {x: run(rail, min(x, ref), max(x, ref), "bisect") for x in pair}  # each end vs a healthy node
            for x, value in split.items():
                if value < cut:
                    named[x] = max(named.get(x, 0.0), value)
            if all(value >= cut for value in split.values()):  # intermittent (loss, noise): said, not blamed
                out.unresolved.append({"rail": rail, "a": pair[0], "b": pair[1], "fraction": ring[pair],
                                       "why": "each end was fast against a healthy node ("
                                              + ", ".join(f"{v:.0%}" for v in split.values()) + ")"})
        out.culprits += [Culprit(x, rail, fraction, median) for x, fraction in sorted(named.items())]
    return out


def rail_pair_group(store, key: str, rank_in_pair: int, ifname: str, timeout_s: float):
    """A 2-rank gloo group whose traffic goes over `ifname` only (one rail), rendezvous under `key`
    in `store`. Both ends must call it with the same key; it returns once they are connected."""
    from datetime import timedelta

    from torch.distributed import PrefixStore, ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._devices = [ProcessGroupGloo.create_device(interface=ifname)]
    options._timeout = timedelta(seconds=timeout_s)
    return ProcessGroupGloo(PrefixStore(key, store), rank_in_pair, 2, options)


def pair_fraction(store, rank: int, pair: tuple[int, int], ifname: str, key: str, link_rate_gbps: float,
                  nbytes: int, iterations: int, timeout_s: float) -> float:
    """One pair test on this rank (one of `pair`): a 2-rank gloo all_reduce bound to `ifname`.

    Returns busbw as a fraction of the link rate; 0.0 when the pair could not complete
    (a dead link: the group's timeout bounds the wait)."""
    import time

    import torch

    try:
        group = rail_pair_group(store, key, pair.index(rank), ifname, timeout_s)
        buf = torch.ones(nbytes // 4, dtype=torch.float32)
        group.allreduce([buf]).wait()  # warm-up: connections and buffers
        started = time.perf_counter()
        for _ in range(iterations):
            group.allreduce([buf]).wait()
        seconds = (time.perf_counter() - started) / iterations
    except RuntimeError:  # gloo's timeout or a reset connection: the pair has no working link
        return 0.0
    busbw_gbit_s = nbytes / seconds * 8 / 1e9  # 2 ranks: busbw = algbw
    return busbw_gbit_s / link_rate_gbps


def distributed_measure(store, rank: int, link_rate_gbps: float, *, nbytes: int = 1 << 20, iterations: int = 3,
                        timeout_s: float = 30.0, on_test: Callable[[int, int, int], None] | None = None) -> Measure:
    """A `Measure` for every rank of the burn-in: the pair's ranks run the test and the first
    publishes the figure in the store; every rank reads it there, so all ranks take the same
    decisions in the same order (and only the pair's links carry traffic)."""
    sequence = iter(range(1 << 30))

    def measure(rail: int, a: int, b: int) -> float:
        key = f"localise/{next(sequence)}/"
        if rank in (a, b):
            value = pair_fraction(store, rank, (a, b), f"rail{rail}", key + "pg/", link_rate_gbps, nbytes,
                                  iterations, timeout_s)
            if rank == a:
                store.set(key + "fraction", repr(value))
        if on_test:
            on_test(rail, a, b)
        return float(store.get(key + "fraction").decode())

    return measure
