"""The fleet-health figure on the controller's /metrics (docs/metrics.md):
`aidc_fleet_healthy_gpu_ratio{pool}` and its parts, `aidc_fleet_{installed,certified,in_service,
healthy}_gpus{pool}`. The fleet's figure is `sum(healthy) / sum(installed)` in PromQL.

A collector computed at scrape time from the audit log (aidc.fleet.figure), with its own read-only
connection, so the figure Prometheus stores is the one `aidc fleet health --at` gives for the
same instant. The replay is remembered and only records newer than the last scrape are applied;
a scrape still reads the rows of the figure's record kinds (the audit log's API has no "after
record N" query), which bench/fleet_health.py measures."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from aidc.fleet.figure import LiveFigure, Rules

PARTS = (("installed", "GPUs installed: every node of the pool, spares included"),
         ("certified", "GPUs certified by their node's newest burn-in certificate (failed GPUs excluded)"),
         ("in_service", "GPUs not quarantined (a node or one GPU taken out by failover)"),
         ("healthy", "GPUs certified and in service"))


class FleetHealthCollector:
    """Register in a CollectorRegistry; `audit_path` is the controller's audit log: a SQLite
    file, or a callable opening it (PostgreSQL, aidc.state)."""

    def __init__(self, spec, audit_path, rules: Rules | None = None):
        self.audit_path = audit_path if callable(audit_path) else Path(audit_path)
        self.live = LiveFigure(spec, rules)
        self.error: str | None = None  # why the last scrape had no figure (the log is not there yet)

    def _catch_up(self):
        from aidc.audit.log import AuditLog

        opened = self.audit_path() if callable(self.audit_path) else AuditLog(self.audit_path, read_only=True)
        with opened as log:
            return self.live.catch_up(log)

    def describe(self):
        return [GaugeMetricFamily("aidc_fleet_healthy_gpu_ratio", "", labels=["pool"])] + [
            GaugeMetricFamily(f"aidc_fleet_{part}_gpus", "", labels=["pool"]) for part, _ in PARTS]

    def collect(self):
        try:
            replay = self._catch_up()
            self.error = None
        except Exception as exc:  # no log yet, or unreadable: no figure rather than a wrong one
            self.error = str(exc)
            return
        pools = replay.pool_capacity()
        ratio = GaugeMetricFamily("aidc_fleet_healthy_gpu_ratio",
                                  "Certified, in-service GPUs over installed GPUs, per pool (the fleet-health figure)",
                                  labels=["pool"])
        families = {part: GaugeMetricFamily(f"aidc_fleet_{part}_gpus", text, labels=["pool"]) for part, text in PARTS}
        for name, capacity in pools.items():
            if capacity.ratio is not None:
                ratio.add_metric([name], capacity.ratio)
            for part, family in families.items():
                family.add_metric([name], getattr(capacity, part))
        yield ratio
        yield from families.values()
