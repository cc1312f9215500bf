"""Stragglers while training: judge this node's ranks against the fleet from the step times
the trainer reports (aidc.lab.trainer.StepTimeReport: `<node_dir>/steptimes.jsonl`).

Each line is one step: every rank's compute time (by the device's clock) and its wait in the
gradient all_reduce (wall time). In synchronous data-parallel all ranks leave the collective
together, so the wall time per step is the same everywhere and says nothing about who is
slow; the split does. Over a sliding window of steps a node is a straggler by either path:

* **slow compute**: each rank's speed over the window is the lower quartile of its compute
  times. On a shared host other work only ever *adds* time to a rank's clock (cache and core
  contention), in bursts, while a slow part is slow on every step, its fastest included: the
  quartile follows the part and not the bursts (measured on the lab's fabric at load ~6: rank
  compute p90 1.3-1.4x the step's median, p10 0.94x). A node is slow when its quartile is more
  than `tolerance` above the fleet median of the quartiles (relative perf = fleet median /
  its quartile, below 1 - tolerance), an outlier against the *other* ranks (z = 0.798 (x -
  their median) / their mean absolute deviation about it, at least `min_robust_z`; 0.798 makes
  it a z for normal noise. Judged against the others because with four ranks the outlier
  would inflate a spread it is part of; a mean, not a median, of the deviations because the
  median of three is one value, zero when two ranks agree. A fleet whose ranks all differ by a
  few percent still flags none of them), and, when `min_slowest_share` is set, the slowest rank
  in at least that share of the steps (off by default: on the traces above it rejected no
  false positive the quartile did not, and doubled the time to detect under load);
* **late arrival**: everyone waits for the slowest rank, so the slow rank is the one that
  waits *least*. It had the least wait in at least `min_wait_share` of the steps, the
  others waited, by the window median, more than `tolerance` of the fleet's step time longer
  than it did, and its wait is a robust-z outlier below the ranks' (same `min_robust_z`). This finds lateness the compute timer cannot see (a host stall, slow input, a
  slow link on the rank's way in); among four ranks a rank is least by chance a quarter of the
  time, so a share of 0.75 over 20 steps does not happen by noise.

* **slow link**: in a ring all_reduce a slow link slows every rank's wait alike, so neither
  path above can name its node. When the trainer probes its links (aidc.lab.trainer.LinkProbe:
  every few steps each rank times a small exchange with its ring neighbour over each rail,
  `links_s` in the step line), the judge takes, per rail and ring link, the median time over
  the last `link_window` probes and applies burn-in's localisation rule
  (aidc.burnin.localise): the reference is the median over nodes of each node's faster link,
  a link is slow when it is more than `link_tolerance` slower than that (speed = reference /
  time below 1 - link_tolerance), and a node whose links to *both* ring neighbours on one
  rail are slow is the straggler, with that rail in the reason. Its neighbours each have one
  slow link only. While a slow link is named anywhere, the late-arrival path is not used: the
  ranks' waits then follow their places in the ring, not their lateness.

The verdict must hold `confirm_steps` steps running before the node is called a straggler:
on a shared host other work slows one rank's clock for a while and then stops (measured here
at load ~30 on 2 cores: single ranks 5-9% slow for 20-40 steps), a slow part stays slow.
It stops being one after a whole window of steps in which neither path held even at half the
tolerance (hysteresis, so a node on the edge does not flap: one episode, one event). The thresholds are data: `policy.stragglers` in the spec.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from aidc.burnin.judge import mad, robust_z

STEP_TIMES_FILE = "steptimes.jsonl"  # in the node's directory, written by each rank on the node
MAX_LINE_BYTES = 1 << 20  # a line longer than this is not the trainer's: skipped


@dataclass(frozen=True)
class StragglerVerdict:
    node: str
    steps: int  # steps in the window
    relative_perf: float  # fleet median / this node's compute, lower quartiles (1.0: with the fleet)
    robust_z: float | None  # of this node's compute speed vs the other ranks' (None: they do not spread)
    wait_share: float  # fraction of steps in which this rank waited least
    lateness: float  # how much longer the others waited than this rank / fleet step time (medians)
    compute_s: float  # window medians of this node's phases
    comm_s: float
    fleet_compute_s: float
    straggler: bool
    link_reason: str | None = None  # this node's slow rail, when the link path names it

    def describe(self) -> str:
        z = "n/a" if self.robust_z is None else f"{self.robust_z:.1f}"
        return (f"{self.link_reason}; " if self.link_reason else "") + (f"training step compute {self.compute_s * 1000:.2f} ms vs fleet median "
                f"{self.fleet_compute_s * 1000:.2f} ms (relative perf {self.relative_perf:.2f}, robust z {z}); "
                f"least communication wait in {self.wait_share:.0%} of the last {self.steps} steps, the others "
                f"waited {self.lateness:.0%} of a step longer")


class StragglerJudge:
    """The sliding window of one node's steps and the rule above."""

    def __init__(self, node: str, window_steps: int, tolerance: float, min_robust_z: float,
                 min_wait_share: float, confirm_steps: int = 1, min_slowest_share: float = 0.0,
                 link_tolerance: float = 0.3, link_window: int = 5):
        self.node, self.window_steps, self.tolerance = node, window_steps, tolerance
        self.link_tolerance = link_tolerance
        self.links: deque[dict] = deque(maxlen=link_window)
        self.min_robust_z, self.min_wait_share, self.confirm_steps = min_robust_z, min_wait_share, confirm_steps
        self.min_slowest_share = min_slowest_share
        self._slow_streak = 0
        self.steps: deque[dict] = deque(maxlen=window_steps)
        self.members: list | None = None
        self.straggling = False
        self._warmup_left = window_steps
        self._clear_streak = 0

    def add(self, record: dict) -> None:
        """One step line. A change of membership (a start, a failover) starts a new window after
        a warm-up of one window's steps, which are not judged: ranks differ while they warm up
        (allocations, caches, lazy initialisation; one rank measured 6-9% slower for its first
        ~30 steps here), and that is not a straggler."""
        members = record.get("nodes")
        if members != self.members:
            self.steps.clear()
            self.links.clear()
            self.members = members
            self._warmup_left = self.window_steps
        if self._warmup_left > 0:
            self._warmup_left -= 1
            return
        self.steps.append(record)
        if record.get("links_s"):
            self.links.append(record["links_s"])

    def slow_links(self, tolerance: float) -> dict[int, str]:
        """Ranks whose links to both ring neighbours on one rail are slow, with the reason (the
        localisation rule above); {} until `link_window` probes are in."""
        n = len(self.members or [])
        if n < 3 or len(self.links) < (self.links.maxlen or 1):
            return {}  # a ring of two has one link: it cannot say which end is slow
        named: dict[int, str] = {}
        for rail in sorted(self.links[-1], key=int):
            samples = [probe.get(rail) for probe in self.links]
            if any(not isinstance(v, list) or len(v) != n for v in samples):
                continue
            link = [statistics.median(probe[i] for probe in samples) for i in range(n)]  # link i: rank i to i + 1
            if min(link) <= 0:
                continue  # a probe that did not run
            best = [min(link[i], link[i - 1]) for i in range(n)]  # each rank's faster link
            reference = statistics.median(best)
            slow = [reference / t < 1 - tolerance for t in link]
            for i in range(n):
                if slow[i] and slow[i - 1] and i not in named:
                    nodes = self.members
                    named[i] = (f"rail {rail}: both ring links slow, {nodes[i - 1]}-{nodes[i]} "
                                f"{reference / link[i - 1]:.0%} and {nodes[i]}-{nodes[(i + 1) % n]} "
                                f"{reference / link[i]:.0%} of the fleet's link speed (median link "
                                f"{reference * 1000:.2f} ms)")
        return named

    def verdict(self) -> StragglerVerdict | None:
        """None until the window is full (or when this node is not in the job)."""
        if len(self.steps) < self.window_steps or not self.members or self.node not in self.members:
            return None
        me = self.members.index(self.node)
        least_waits, slowest, mine_compute, mine_comm, fleet, excess, step = 0, 0, [], [], [], [], []
        per_rank: list[list[float]] = [[] for _ in self.members]
        waits: list[list[float]] = [[] for _ in self.members]
        for rec in self.steps:
            compute, comm = rec["compute_s"], rec["comm_s"]
            median = statistics.median(compute)
            least_waits += comm[me] <= min(comm)
            slowest += compute[me] >= max(compute)
            mine_compute.append(compute[me])
            mine_comm.append(comm[me])
            fleet.append(median)
            excess.append(statistics.median(comm) - comm[me])
            step.append(median + statistics.median(comm))
            for rank, value in enumerate(compute):
                per_rank[rank].append(value)
                waits[rank].append(comm[rank])
        speeds = [_lower_quartile(v) for v in per_rank]  # see "slow compute" above
        others = speeds[:me] + speeds[me + 1:]
        centre = statistics.median(others)
        spread = statistics.fmean(abs(v - centre) for v in others)
        z = 0.798 * (speeds[me] - centre) / spread if spread > 0 else robust_z(speeds[me], centre, 0.0)
        wait_medians = [statistics.median(v) for v in waits]
        wait_z = robust_z(wait_medians[me], statistics.median(wait_medians), mad(wait_medians))
        relative = statistics.median(speeds) / speeds[me] if speeds[me] > 0 else 1.0
        share = least_waits / len(self.steps)
        # How much longer the others waited than this rank, against the fleet's step time.
        lateness = statistics.median(excess) / max(statistics.median(step), 1e-9)

        links_named = self.slow_links(self.link_tolerance)

        def slow(scale: float) -> bool:
            tolerance = self.tolerance * scale
            slow_compute = (relative < 1 - tolerance and z >= self.min_robust_z
                            and slowest >= self.min_slowest_share * len(self.steps))
            late = (share >= self.min_wait_share and lateness > tolerance and -wait_z >= self.min_robust_z
                    and not links_named)
            slow_link = me in (links_named if scale == 1 else self.slow_links(self.link_tolerance * scale))
            return slow_compute or late or slow_link

        if not self.straggling:  # a straggler only once the window said so `confirm_steps` times running
            self._slow_streak = self._slow_streak + 1 if slow(1) else 0
            if self._slow_streak >= self.confirm_steps:
                self.straggling, self._slow_streak = True, 0
        else:  # over only after a whole window of steps without it, even at half the tolerance
            self._clear_streak = 0 if slow(0.5) else self._clear_streak + 1
            if self._clear_streak >= self.window_steps:
                self.straggling, self._clear_streak = False, 0
        return StragglerVerdict(self.node, len(self.steps), relative, z if math.isfinite(z) else None, share,
                                lateness, statistics.median(mine_compute), statistics.median(mine_comm),
                                statistics.median(fleet), self.straggling, links_named.get(me))


def _lower_quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]


def parse_step_line(line: str) -> dict | None:
    """A step line from the trainer, or None for anything else (a torn or foreign line)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
        return None
    compute, comm, nodes = rec.get("compute_s"), rec.get("comm_s"), rec.get("nodes")
    if not (isinstance(compute, list) and isinstance(comm, list) and isinstance(nodes, list)
            and len(compute) == len(comm) == len(nodes) > 0):
        return None
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in compute + comm):
        return None
    links = rec.get("links_s")
    if links is not None and not (isinstance(links, dict) and all(
            isinstance(v, list) and len(v) == len(nodes)
            and all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in v) for v in links.values())):
        rec.pop("links_s")  # the step stands; its link figures are not judged
    return rec


class StepTimeFollower:
    """Complete lines appended to the step-time file since the saved offset. A file shorter
    than the offset (a new job) is read from its start."""

    def __init__(self, path: str | Path, offset: int = 0):
        self.path, self.offset = Path(path), offset

    def read(self, max_bytes: int = 4 << 20) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []  # no training on this node (yet)
        if size < self.offset:
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max_bytes)
        end = chunk.rfind(b"\n")
        if end < 0:
            if len(chunk) == max_bytes:  # one line longer than a read: not the trainer's, skipped
                self.offset += len(chunk)
            return []
        self.offset += end + 1
        records = []
        for raw in chunk[:end].split(b"\n"):
            if len(raw) <= MAX_LINE_BYTES:
                rec = parse_step_line(raw.decode("utf-8", errors="replace"))
                if rec is not None:
                    records.append(rec)
        return records


class StragglerWatch:
    """One node's step-time file and its judge, as the health agent runs them."""

    def __init__(self, node: str, path: str | Path, policy, offset: int = 0):
        self.follower = StepTimeFollower(path, offset)
        self.judge = StragglerJudge(node, policy.window_steps, policy.tolerance, policy.min_robust_z,
                                    policy.min_wait_share, policy.confirm_steps, policy.min_slowest_share,
                                    policy.link_tolerance, policy.link_window)

    def verdicts(self) -> list[StragglerVerdict]:
        """A verdict after each new step, once the window is full."""
        out = []
        for rec in self.follower.read():
            self.judge.add(rec)
            v = self.judge.verdict()
            if v is not None:
                out.append(v)
        return out
