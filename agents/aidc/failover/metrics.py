"""The failover controller's Prometheus metrics (docs/metrics.md): the circuit breaker and
escalations. Its own registry, so several controllers (tests) can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server


class FailoverMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.breaker_open = Gauge("aidc_failover_breaker_open",
                                  "1 while the failover circuit breaker is open (failover does not act)",
                                  registry=self.registry)
        self.escalations = Counter("aidc_failover_escalations_total",
                                   "Fault actions moved up the ladder by repetition or a node's remediation history",
                                   ("from_action", "to_action"), registry=self.registry)
        self._server = None

    def breaker(self, is_open: bool) -> None:
        self.breaker_open.set(1 if is_open else 0)

    def escalated(self, from_action: str, to_action: str) -> None:
        self.escalations.labels(from_action=from_action, to_action=to_action).inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Serve /metrics on addr:port (loopback by default); returns the server."""
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._server

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
