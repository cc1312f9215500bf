"""The fleet-health figure: how much of the installed GPU capacity is certified and in service.

    healthy_gpu_ratio = healthy GPUs / installed GPUs

* installed: every GPU of the stack's node pools, spares included (`count + spares` nodes of
  `gpus_per_node`), so that a figure does not rise because a pool was shrunk on paper;
* certified: the GPUs of nodes whose newest burn-in certificate passed, less the GPUs that
  certificate names as failed (`failed_gpus`);
* in service: not taken out by a quarantine (a whole node, or one GPU where the record names
  one) since its last release;
* healthy: certified and in service.

It is computed per pool and for the fleet, and never read from a mutable table: it is a replay,
in audit order, of the records `data/fleet_health.yaml` names, up to an instant. The audit log
is hash-chained and append-only, so the answer for a past instant is the same whenever it is
asked, and two dates (before and after an upgrade) or two sites (same rules version) compare.
Goodput is shown beside it where jobs report it (the newest `goodput.report`: ETTR, productive
time over wall time), not folded into it: a job's ETTR is not a property of the hardware.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from dataclasses import dataclass, field
from importlib import resources

import yaml

from aidc.errors import AidcError

RULES_FILE = "data/fleet_health.yaml"
RULE_KINDS = ("certified_by", "out_of_service", "back_in_service", "goodput")


@dataclass(frozen=True)
class Rules:
    """Which audit record kinds certify, take out, return, and report goodput."""

    version: str
    certified_by: tuple[str, ...]
    out_of_service: tuple[str, ...]
    back_in_service: tuple[str, ...]
    goodput: tuple[str, ...]

    @classmethod
    def parse(cls, data, where: str) -> "Rules":
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise AidcError(f"{where}: expected a mapping with a string `version`")
        kinds = {}
        for name in RULE_KINDS:
            value = data.get(name)
            if not isinstance(value, list) or not value or not all(isinstance(k, str) and k for k in value):
                raise AidcError(f"{where}: `{name}` must be a non-empty list of audit record kinds")
            kinds[name] = tuple(value)
        unknown = set(data) - set(RULE_KINDS) - {"version"}
        if unknown:
            raise AidcError(f"{where}: unknown key(s) {sorted(unknown)}; expected version, {', '.join(RULE_KINDS)}")
        return cls(data["version"], **kinds)

    @classmethod
    def shipped(cls) -> "Rules":
        text = resources.files("aidc").joinpath(RULES_FILE).read_text()
        return cls.parse(yaml.safe_load(text), f"aidc/{RULES_FILE}")

    def kinds(self) -> tuple[str, ...]:
        return self.certified_by + self.out_of_service + self.back_in_service + self.goodput


@dataclass(frozen=True)
class Capacity:
    """GPU counts of a pool or the fleet, and the figure."""

    installed: int
    certified: int
    in_service: int
    healthy: int

    @property
    def ratio(self) -> float | None:
        return self.healthy / self.installed if self.installed else None

    def __add__(self, other: "Capacity") -> "Capacity":
        return Capacity(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def to_dict(self) -> dict:
        ratio = self.ratio
        return {"healthy_gpu_ratio": None if ratio is None else round(ratio, 6), "installed_gpus": self.installed,
                "certified_gpus": self.certified, "in_service_gpus": self.in_service, "healthy_gpus": self.healthy}


@dataclass
class Standing:
    """One node's standing, as the replayed records left it."""

    node: str
    pool: str
    gpus: int
    spare: bool
    verdict: str | None = None          # the newest certificate's: pass | fail | None (never certified)
    certified_at: float | None = None
    failed_gpus: frozenset = frozenset()
    node_out: bool = False              # the whole node quarantined
    gpus_out: set = field(default_factory=set)
    out_record: dict | None = None      # who took it (or a GPU of it) out, when and why
    returned_at: float | None = None    # its last return to service (a release)

    def certified_gpus(self) -> set[int]:
        return set(range(self.gpus)) - set(self.failed_gpus) if self.verdict == "pass" else set()

    def in_service_gpus(self) -> set[int]:
        return set() if self.node_out else set(range(self.gpus)) - self.gpus_out

    def capacity(self) -> Capacity:
        certified, serving = self.certified_gpus(), self.in_service_gpus()
        return Capacity(self.gpus, len(certified), len(serving), len(certified & serving))

    @property
    def health(self) -> str:
        """One word: healthy | quarantined | degraded (some GPUs out or failed) | uncertified."""
        if self.node_out:
            return "quarantined"
        if self.verdict != "pass":
            return "uncertified"
        return "healthy" if self.capacity().healthy == self.gpus else "degraded"

    def to_dict(self) -> dict:
        return {"node": self.node, "pool": self.pool, "spare": self.spare, "gpus": self.gpus, "health": self.health,
                "certificate_verdict": self.verdict, "certified_at": self.certified_at,
                "failed_gpus": sorted(self.failed_gpus), "quarantined": self.node_out,
                "quarantined_gpus": sorted(self.gpus_out), "quarantine": self.out_record,
                **self.capacity().to_dict()}


def _gpu_of(payload: dict) -> int | None:
    gpu = payload.get("gpu")
    return gpu if isinstance(gpu, int) and not isinstance(gpu, bool) else None


class Replay:
    """Applies audit records, in order, to the standings of the spec's nodes."""

    def __init__(self, spec, rules: Rules | None = None):
        self.rules = rules or Rules.shipped()
        self.standings = {n.name: Standing(n.name, n.pool, n.gpus, n.spare) for n in spec.nodes()}
        self.pools = [p.name for p in spec.node_pools]
        # Kept up to date by apply(): an answer after each change costs O(pools), not O(nodes).
        self.totals = {name: Capacity(0, 0, 0, 0) for name in self.pools}
        for standing in self.standings.values():
            self.totals[standing.pool] = self.totals[standing.pool] + standing.capacity()
        self.goodput: dict | None = None
        self.last_seq = 0
        self.ignored: set[str] = set()  # names in records that are no node of the spec

    def apply(self, record) -> bool:
        """Apply one record; True when it changed a standing (the figure may have moved)."""
        self.last_seq = max(self.last_seq, record.seq)
        if record.dry_run:
            return False
        payload = record.payload if isinstance(record.payload, dict) else {}
        if record.kind in self.rules.goodput:
            reported = payload.get("goodput")
            if isinstance(reported, dict) and isinstance(reported.get("ettr"), (int, float)):
                self.goodput = {"job": reported.get("job"), "ettr": reported["ettr"], "at": record.ts,
                                "audit_seq": record.seq}
            return False
        standing = self.standings.get(record.node or "")
        if standing is None:
            if record.node:
                self.ignored.add(record.node)
            return False
        before = standing.capacity()
        gpu = _gpu_of(payload)
        if record.kind in self.rules.certified_by:
            standing.verdict = payload.get("verdict") if isinstance(payload.get("verdict"), str) else None
            standing.certified_at = record.ts
            failed = payload.get("failed_gpus") or []
            standing.failed_gpus = frozenset(g for g in failed if isinstance(g, int))
        elif record.kind in self.rules.out_of_service:
            if gpu is None:
                standing.node_out = True
            else:
                standing.gpus_out.add(gpu)
            standing.out_record = {"by": record.actor, "reason": record.reason, "at": record.ts,
                                   "audit_seq": record.seq, "gpu": gpu}
        elif record.kind in self.rules.back_in_service:
            if gpu is None:
                standing.node_out, standing.gpus_out = False, set()
            else:
                standing.gpus_out.discard(gpu)
            if not standing.node_out and not standing.gpus_out:
                standing.out_record = None
            standing.returned_at = record.ts
        else:
            return False
        after = standing.capacity()
        if after == before:
            return False
        difference = Capacity(*(a - b for a, b in zip(dataclasses.astuple(after), dataclasses.astuple(before))))
        self.totals[standing.pool] = self.totals[standing.pool] + difference
        return True

    def pool_capacity(self) -> dict[str, Capacity]:
        return dict(self.totals)

    def answer(self, at: float, pool: str | None = None) -> dict:
        pools = self.pool_capacity()
        fleet = sum(pools.values(), Capacity(0, 0, 0, 0))
        shown = {name: c.to_dict() for name, c in pools.items() if pool is None or name == pool}
        return {"at": at, "at_utc": utc(at), "rules_version": self.rules.version, "audit_seq": self.last_seq,
                "definition": DEFINITION, "fleet": fleet.to_dict(), "pools": shown, "goodput": self.goodput}


class LiveFigure:
    """A replay kept up to date: each `catch_up(audit)` applies only the records newer than the
    last one it saw (the controller's /metrics and the health API read the figure this way)."""

    def __init__(self, spec, rules: Rules | None = None):
        self.rules = rules or Rules.shipped()
        self.replay = Replay(spec, self.rules)
        self._lock = threading.Lock()  # two scrapes at once apply each record once

    def catch_up(self, audit) -> Replay:
        with self._lock:
            fresh = [r for kind in dict.fromkeys(self.rules.kinds()) for r in audit.records(kind=kind)
                     if r.seq > self.replay.last_seq]
            for record in sorted(fresh, key=lambda r: r.seq):
                self.replay.apply(record)
            return self.replay


DEFINITION = ("healthy_gpu_ratio = GPUs certified by their node's newest burn-in certificate and in service "
              "(not quarantined) / GPUs installed (every pool's nodes and spares)")


def audit_records(audit, rules: Rules) -> list:
    """The records the figure is replayed from, in audit order."""
    records = [r for kind in dict.fromkeys(rules.kinds()) for r in audit.records(kind=kind)]
    return sorted(records, key=lambda r: r.seq)


def check_pool(spec, pool: str | None) -> None:
    names = [p.name for p in spec.node_pools]
    if pool is not None and pool not in names:
        raise AidcError(f"no pool {pool!r} in stack {spec.name!r}: its pools are {', '.join(names)}")


def figure_at(spec, records: list, at: float, pool: str | None = None, rules: Rules | None = None) -> dict:
    """The figure as it stood at `at` (records with ts <= at)."""
    check_pool(spec, pool)
    replay = Replay(spec, rules)
    for record in records:
        if record.ts > at:
            break
        replay.apply(record)
    return replay.answer(at, pool)


def compare(spec, records: list, before: float, after: float, pool: str | None = None,
            rules: Rules | None = None) -> dict:
    """The figure at `before` and at `after`, their difference, and every change in between
    (so a drop and its recovery inside the window both show, and the lowest point)."""
    check_pool(spec, pool)
    if after < before:
        raise AidcError(f"--compare T1 T2: T2 ({utc(after)}) is before T1 ({utc(before)})")
    replay = Replay(spec, rules)
    first, changes = None, []
    for record in records:
        if record.ts > after:
            break
        if first is None and record.ts > before:
            first = replay.answer(before, pool)
        changed = replay.apply(record)
        if changed and record.ts > before:
            now = replay.answer(record.ts, pool)
            changes.append({"at": record.ts, "at_utc": utc(record.ts), "audit_seq": record.seq, "kind": record.kind,
                            "node": record.node, "by": record.actor, "reason": record.reason,
                            "fleet_ratio": now["fleet"]["healthy_gpu_ratio"],
                            "pools": {n: c["healthy_gpu_ratio"] for n, c in now["pools"].items()}})
    if first is None:
        first = replay.answer(before, pool)
    last = replay.answer(after, pool)
    ratios = [first["fleet"]["healthy_gpu_ratio"]] + [c["fleet_ratio"] for c in changes]
    known = [r for r in ratios if r is not None]
    lowest = min(known) if known else None
    return {"before": first, "after": last, "delta": _delta(first, last), "changes": changes,
            "lowest_fleet_ratio": lowest,
            "dropped": lowest is not None and first["fleet"]["healthy_gpu_ratio"] is not None
            and lowest < first["fleet"]["healthy_gpu_ratio"],
            "recovered": _recovered(first, last, lowest)}


def _delta(first: dict, last: dict) -> dict:
    def diff(a: dict, b: dict) -> dict:
        out = {k: b[k] - a[k] for k in ("installed_gpus", "certified_gpus", "in_service_gpus", "healthy_gpus")}
        ra, rb = a["healthy_gpu_ratio"], b["healthy_gpu_ratio"]
        out["healthy_gpu_ratio"] = None if ra is None or rb is None else round(rb - ra, 6)
        return out
    return {"fleet": diff(first["fleet"], last["fleet"]),
            "pools": {n: diff(first["pools"][n], last["pools"][n]) for n in first["pools"]}}


def _recovered(first: dict, last: dict, lowest: float | None) -> bool:
    start, end = first["fleet"]["healthy_gpu_ratio"], last["fleet"]["healthy_gpu_ratio"]
    return None not in (start, end, lowest) and lowest < start and end >= start


def utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_instant(text: str) -> float:
    """An instant as Unix seconds or ISO 8601 (a time without an offset is UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise AidcError(f"{text!r} is not a time: give Unix seconds or ISO 8601, e.g. 2026-12-07T09:30:00Z") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def for_report(records: list, stack: str | None) -> dict | None:
    """The figure beside the report's verdict: at the log's last record and, where failover
    quarantined something, just before the first quarantine and at its lowest since (so a drop
    and its recovery show). None when the log names no stack; a `missing` reason when the stack
    does not load here (the installed capacity comes from its node pools)."""
    if not records or not stack or stack == "-":
        return None
    from aidc.spec import load_stack

    try:
        spec = load_stack(stack)
    except Exception:  # a report is still written without the figure; it says why
        return {"missing": f"stack {stack!r} does not load here, so the installed GPU capacity is unknown"}
    rules = Rules.shipped()
    first_out = next((r for r in records if r.kind in rules.out_of_service and not r.dry_run), None)
    if first_out is None:
        return {"stack": stack, "end": figure_at(spec, records, records[-1].ts, rules=rules), "before_first_out": None,
                "lowest_fleet_ratio": None}
    result = compare(spec, records, first_out.ts - 1e-6, records[-1].ts, rules=rules)
    return {"stack": stack, "end": result["after"], "before_first_out": result["before"],
            "lowest_fleet_ratio": result["lowest_fleet_ratio"]}
