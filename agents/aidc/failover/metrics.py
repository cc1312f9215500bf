"""The failover controller's Prometheus metrics (docs/metrics.md): the circuit breaker,
escalations, whether this controller holds the lease and how long the oldest undecided event
has waited. Its own registry, so several controllers (tests) can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app

from aidc.probes import Probe, metrics_app, serve_wsgi


class FailoverMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.breaker_open = Gauge("aidc_failover_breaker_open",
                                  "1 while the failover circuit breaker is open (failover does not act)",
                                  registry=self.registry)
        self.escalations = Counter("aidc_failover_escalations_total",
                                   "Fault actions moved up the ladder by repetition or a node's remediation history",
                                   ("from_action", "to_action"), registry=self.registry)
        # Every controller serves both, holding the lease or not: the rules take the max over
        # controllers, so "nobody holds it" and "an event waits while nobody decides" both show.
        self.lease_held = Gauge("aidc_failover_lease_held",
                                "1 while this controller holds the controller lease and may act",
                                registry=self.registry)
        self.oldest_undecided_age = Gauge("aidc_failover_oldest_undecided_event_age_seconds",
                                          "Seconds the oldest fault event without a decision has waited (0: none)",
                                          registry=self.registry)
        # One series per node or GPU marked a repeat offender (aidc.failover.offenders); gpu=""
        # for a node. Few by nature: a part is marked, then repaired or replaced.
        self.repeat_offender = Gauge("aidc_failover_repeat_offender",
                                     "1 for each node or GPU marked a repeat offender (for repair/RMA; an approver "
                                     "clears it)", ("node", "gpu"), registry=self.registry)
        self.gpus_out = Gauge("aidc_failover_gpus_out",
                              "GPUs out of service as failover counts them for policy.max_unavailable_gpus",
                              registry=self.registry)

        # The fleet-health figure (aidc.fleet.metrics), served beside these: its own registry,
        # since it is the fleet's figure, not the controller's state.
        self.fleet_registry = CollectorRegistry(auto_describe=True)
        # ... and collected through the controller's registry, so the one WSGI app serves both
        # (its names are not known at registration: a `name[]` filter does not select them).
        self.registry.register(self.fleet_registry)
        self._server = None

    def offenders(self, marks) -> None:
        self.repeat_offender.clear()
        for mark in marks:
            gpu = "" if mark.get("gpu") is None else str(mark["gpu"])
            self.repeat_offender.labels(node=mark["node"], gpu=gpu).set(1)

    def add_fleet_health(self, spec, audit_path) -> None:
        """Serve the fleet-health figure of `spec`'s pools, replayed from this audit log."""
        from aidc.fleet.metrics import FleetHealthCollector

        self.fleet_registry.register(FleetHealthCollector(spec, audit_path))

    def breaker(self, is_open: bool) -> None:
        self.breaker_open.set(1 if is_open else 0)

    def escalated(self, from_action: str, to_action: str) -> None:
        self.escalations.labels(from_action=from_action, to_action=to_action).inc()

    def lease(self, held: bool) -> None:
        self.lease_held.set(1 if held else 0)

    def undecided_age(self, seconds: float) -> None:
        self.oldest_undecided_age.set(max(0.0, seconds))

    def _render(self) -> bytes:
        return generate_latest(self.registry)

    def text(self) -> str:
        return self._render().decode()

    def serve(self, port: int, addr: str = "127.0.0.1", probe: Probe | None = None):
        """Serve /metrics (and with `probe`, /healthz and /readyz) on addr:port (loopback by
        default); returns the server."""
        app = metrics_app(make_wsgi_app(self.registry), probe)
        self._server = serve_wsgi(app, addr, port, name="failover-metrics")
        return self._server

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
