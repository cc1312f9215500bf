"""The receiver's own telemetry: Prometheus metrics on GET /metrics, and JSON-lines logs.

Label values are bounded: routes outside the known ones count as `other`, refusal reasons are
a fixed set named after the status code, so a client cannot grow the series by inventing paths.
"""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from aidc.logs import JsonLines  # the one log schema of every daemon

__all__ = ["CONTENT_TYPE_LATEST", "JsonLines", "ReceiverMetrics", "REFUSAL_REASONS"]

ROUTES = ("/", "/alerts", "/api/v1/alerts", "/runs", "/healthz", "/metrics")
REFUSAL_REASONS = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
                   405: "method_not_allowed", 408: "timeout", 411: "length_required", 413: "too_large",
                   431: "head_too_large", 503: "busy"}


class ReceiverMetrics:
    def __init__(self, open_connections: Callable[[], int], refused_connections: Callable[[], dict[str, int]]):
        # refused_connections(): the server's running counts of connections refused or dropped
        # before a request, by reason (busy, per_source, handshake_evicted, handshake_timeout).
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("aidc_receiver_requests", "HTTP requests answered, by method, route and status code.",
                                ["method", "route", "code"], registry=self.registry)
        self.refusals = Counter("aidc_receiver_refusals", "Requests refused (4xx, 503), by reason; connections "
                                "refused or dropped before a request count as busy (--max-connections), "
                                "per_source (--max-per-source), handshake_evicted (an unfinished TLS "
                                "handshake dropped for a newer one) and handshake_timeout.",
                                ["reason"], registry=self.registry)
        self.alerts = Counter("aidc_receiver_alerts", "Alerts received, by what the engine made of them "
                              "(started, dry_run, duplicate, cooldown, node_busy, unmatched, ...).",
                              ["outcome"], registry=self.registry)
        self.runs = Counter("aidc_receiver_runs_finished", "Runbook runs this receiver executed to the end, "
                            "by status (done, failed).", ["status"], registry=self.registry)
        Gauge("aidc_receiver_open_connections", "Connections open now.",
              registry=self.registry).set_function(open_connections)
        self._refused_connections = refused_connections
        self._connections_seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def answered(self, method: str, route: str, code: int) -> None:
        route = route if route in ROUTES else "other"
        method = method if method in ("GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS") else "other"
        self.requests.labels(method, route, str(code)).inc()
        if code >= 400 and code != 500:
            self.refusals.labels(REFUSAL_REASONS.get(code, f"http_{code // 100}xx")).inc()

    def alert(self, outcome: str) -> None:
        self.alerts.labels(outcome).inc()

    def run_finished(self, status: str) -> None:
        self.runs.labels(status).inc()

    def exposition(self) -> str:
        # Connections refused before a request are counted on the I/O thread: fold the server's
        # running counts in at scrape time.
        with self._lock:
            for reason, total in self._refused_connections().items():
                seen = self._connections_seen.get(reason, 0)
                if total > seen:
                    self.refusals.labels(reason).inc(total - seen)
                    self._connections_seen[reason] = total
        return generate_latest(self.registry).decode()


