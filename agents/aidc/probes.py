"""Liveness and readiness of a long-running aidc process (agent, failover controller, runbook
receiver), answered as /healthz and /readyz beside its /metrics.

/healthz: the process is alive and its main loop turned within `stall_after_s` (a loop stuck on
a lock, a hung call or a dead thread fails it; until the first turn the time counts from start,
so a start stuck before its loop fails it too). /readyz: the component said it is ready (what
that means is its own: the agent's first device read, the controller's store, audit and loop,
the receiver's catalog and state) and it is live. Both answer JSON, 200 or 503.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

# Seconds without a loop turn before /healthz fails: the Kubernetes probes' period times their
# failure threshold is added on top, so a restart comes about a minute after a loop stalls.
DEFAULT_STALL_AFTER_S = 30.0
PROBE_PATHS = ("/healthz", "/readyz")


class Probe:
    def __init__(self, component: str, stall_after_s: float = DEFAULT_STALL_AFTER_S,
                 clock: Callable[[], float] = time.monotonic):
        if not stall_after_s > 0:
            raise ValueError(f"stall_after_s must be positive, not {stall_after_s}")
        self.component, self.stall_after_s, self.clock = component, stall_after_s, clock
        self._started = clock()
        self._last_turn: float | None = None
        self._turns = 0
        self._ready = False
        self._detail: dict = {}
        self._lock = threading.Lock()

    def turned(self, **detail) -> None:
        """The main loop completed a turn; `detail` (e.g. leader) is reported in both bodies."""
        with self._lock:
            self._last_turn = self.clock()
            self._turns += 1
            self._detail.update(detail)

    def ready(self, **detail) -> None:
        """What the component needs before it does its work is in place."""
        with self._lock:
            self._ready = True
            self._detail.update(detail)

    def healthz(self) -> tuple[int, dict]:
        with self._lock:
            since = self._last_turn if self._last_turn is not None else self._started
            age = self.clock() - since
            live = age <= self.stall_after_s
            body = {"component": self.component, "live": live, "loop_turns": self._turns,
                    "seconds_since_turn": round(age, 3) if self._last_turn is not None else None,
                    "stall_after_s": self.stall_after_s, **self._detail}
        return (200 if live else 503), body

    def readyz(self) -> tuple[int, dict]:
        code, body = self.healthz()
        with self._lock:
            ready = self._ready and code == 200
        return (200 if ready else 503), {**body, "ready": ready}

    def answer(self, path: str) -> tuple[int, bytes] | None:
        """(status, JSON body) for a probe path; None for any other path."""
        if path == "/healthz":
            code, body = self.healthz()
        elif path == "/readyz":
            code, body = self.readyz()
        else:
            return None
        return code, json.dumps(body, sort_keys=True).encode() + b"\n"


_REASONS = {200: "200 OK", 503: "503 Service Unavailable"}


def metrics_app(metrics, probe: Probe | None):
    """One WSGI app for one listening port: /healthz and /readyz from `probe`, /metrics (and /)
    from `metrics`, a WSGI app: prometheus_client's own (make_wsgi_app: content negotiation,
    gzip, `name[]` filters), or rendered_app where the text itself must differ (the agent)."""
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        answer = probe.answer(path) if probe is not None else None
        if answer is not None:
            code, body = answer
            start_response(_REASONS[code], [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
            return [body]
        if path not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            wanted = "/metrics, /healthz, /readyz" if probe is not None else "/metrics"
            return [f"not found: {wanted}\n".encode()]
        return metrics(environ, start_response)
    return app


def rendered_app(render: Callable[[], bytes], content_type: str):
    """A WSGI app answering every request with `render()` (the agent's dcgm-exporter-compatible
    text, which prometheus_client's own exposition cannot produce: see health.exporter.render)."""
    def app(_environ, start_response):
        body = render()
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]
    return app


def serve_wsgi(app, addr: str, port: int, tls=None, name: str = "metrics"):
    """Serve `app` on addr:port in a daemon thread, over HTTPS with `tls` (an
    aidc.runbook.tls.TLSConfig). Returns the server (shutdown() and server_close() stop it)."""
    server_class = _V6Server if ":" in addr else _Server
    server = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
    if tls is not None:
        server.socket = tls.server_context().wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scraper that hangs up mid-request never keeps the process from exiting


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 -- scrapes and probes are not worth a log line each
        pass
