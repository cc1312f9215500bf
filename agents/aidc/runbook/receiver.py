"""`aidc runbook serve`: the Alertmanager webhook receiver.

Requests are checked in the cheapest order (auth, then size, then JSON), answered with a
4xx and one log line when bad, and never crash the server. Accepted alerts become runs
through the engine (which deduplicates); runs execute on worker threads, and a scanner
picks up runs nobody executes: after a restart (crash recovery), after an approval, or
when all workers were busy.

Authentication is a bearer token, mutual TLS (`aidc.runbook.tls`), or both; a receiver
with neither refuses to start. Under TLS the handshake runs on the request's own thread,
so a slow or hostile client cannot stall the accept loop.
"""

from __future__ import annotations

import hmac
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aidc.runbook.engine import Engine, Submission
from aidc.runbook.tls import HANDSHAKE_TIMEOUT_S, TLSConfig, peer_identity

MAX_BODY_BYTES = 1 << 20  # Alertmanager caps a notification's alerts; 1 MiB is far beyond a real one
DRAIN_LIMIT_BYTES = 8 << 20
WEBHOOK_PATHS = ("/", "/alerts", "/api/v1/alerts")


class BadRequest(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def validate_payload(body: bytes) -> list[dict]:
    """The alerts of an Alertmanager webhook (version 4) payload, or BadRequest(400)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"malformed JSON: {exc}") from None
    except RecursionError:  # deeply nested arrays or objects: no real notification looks like that
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("alerts"), list):
        raise BadRequest(400, "expected an Alertmanager webhook object with an 'alerts' list")
    for i, alert in enumerate(doc["alerts"]):
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise BadRequest(400, f"alerts[{i}]: expected an object with a 'labels' object")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in alert["labels"].items()):
            raise BadRequest(400, f"alerts[{i}].labels: expected string keys and values")
    return doc["alerts"]


class _WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, ssl_context: ssl.SSLContext | None, log):
        self.ssl_context, self.log = ssl_context, log
        super().__init__(address, handler)

    def get_request(self):
        sock, address = super().get_request()
        if self.ssl_context is not None:
            # Wrap only: the handshake waits for the request's thread (finish_request).
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def finish_request(self, request, client_address):
        if self.ssl_context is not None:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
                self.log(f"TLS handshake refused from {client_address[0]}: {reason}")
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        # One line, not socketserver's traceback on stderr.
        exc = sys.exc_info()[1]
        self.log(f"connection from {client_address[0]} ended: {type(exc).__name__}: {exc}")


class Receiver:
    def __init__(self, engine: Engine, token: str | None, host: str = "127.0.0.1", port: int = 9097,
                 max_workers: int = 8, scan_interval_s: float = 1.0, log=None, tls: TLSConfig | None = None,
                 request_timeout_s: float = 10.0):
        if not token and not (tls and tls.mutual):
            raise ValueError("authentication is required: a bearer token, or mutual TLS (a client CA)")
        self.engine, self.token, self.tls = engine, token or None, tls
        self.max_workers, self.scan_interval_s = max_workers, scan_interval_s
        self.request_timeout_s = request_timeout_s
        self.log = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} aidc runbook serve: {line}",
                                               file=sys.stderr, flush=True))
        self._executing: set[int] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        context = tls.server_context() if tls else None
        self.httpd = _WebhookServer((host, port), self._handler_class(), context, self.log)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    # --- HTTP -----------------------------------------------------------------------------
    def _handler_class(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = receiver.request_timeout_s  # a client that stalls mid-body loses its connection, not a thread
            server_version = "aidc-runbook"

            def log_message(self, fmt, *args):  # one line per request comes from _respond instead
                pass

            def _respond(self, code: int, body: dict, note: str) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="aidc-runbook"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                who = self.client_address[0] + (f" ({self.peer})" if self.peer else "")
                receiver.log(f"{code} {self.command} {self.path} from {who}: {note}")

            @property
            def peer(self) -> str | None:
                return peer_identity(self.connection)

            def _authorized(self) -> bool:
                if receiver.token is None:
                    return True  # mutual TLS only: the handshake already verified the client
                header = self.headers.get("Authorization", "")
                scheme, _, token = header.partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          receiver.token.encode())

            def do_GET(self):
                try:
                    if self.path == "/healthz":
                        return self._respond(200, {"ok": True}, "health")
                    if not self._authorized():
                        return self._respond(401, {"error": "bearer token required"}, "unauthenticated")
                    if self.path == "/runs":
                        runs = [r.to_dict() for r in receiver.engine.state.runs()]
                        return self._respond(200, {"runs": runs}, f"{len(runs)} runs")
                    self._respond(404, {"error": "not found"}, "unknown path")
                except Exception as exc:  # never let a request kill the server
                    self._fail(exc)

            def do_POST(self):
                try:
                    self._post()
                except BadRequest as exc:
                    self.close_connection = True
                    self._respond(exc.code, {"error": exc.reason}, exc.reason)
                except Exception as exc:
                    self._fail(exc)

            def _fail(self, exc: Exception) -> None:
                self.close_connection = True
                try:
                    self._respond(500, {"error": "internal error"}, f"internal error: {type(exc).__name__}: {exc}")
                except Exception:
                    receiver.log(f"500 {self.path}: {type(exc).__name__}: {exc} (response not sent)")

            def _drain(self, size: int) -> None:
                # Read (and drop) a moderately oversized body so the client sees the 413 rather
                # than a reset connection; a huge one is cut off.
                left = min(size, DRAIN_LIMIT_BYTES)
                while left > 0:
                    chunk = self.rfile.read(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)

            def _post(self):
                if not self._authorized():
                    raise BadRequest(401, "missing or wrong bearer token")
                if self.path not in WEBHOOK_PATHS:
                    raise BadRequest(404, f"unknown path {self.path}")
                length = self.headers.get("Content-Length")
                if length is None:
                    raise BadRequest(411, "Content-Length required")
                try:
                    size = int(length)
                except ValueError:
                    raise BadRequest(400, f"bad Content-Length {length!r}") from None
                if size < 0:
                    raise BadRequest(400, f"bad Content-Length {length!r}")
                if size > MAX_BODY_BYTES:
                    self._drain(size)
                    raise BadRequest(413, f"payload of {size} bytes exceeds {MAX_BODY_BYTES}")
                try:
                    body = self.rfile.read(size)
                except TimeoutError:
                    raise BadRequest(408, f"body not received within {self.timeout:g} s") from None
                if len(body) < size:
                    raise BadRequest(400, f"body ended after {len(body)} of {size} bytes (Content-Length)")
                alerts = validate_payload(body)
                sender = {"address": self.client_address[0], **({"client": self.peer} if self.peer else {})}
                results = [receiver.accept(a, sender) for a in alerts]
                summary = ", ".join(f"{r.outcome}:{r.runbook or '-'}@{r.node or '-'}" for r in results) or "no alerts"
                self._respond(200, {"results": [r.to_dict() for r in results]}, summary)

        return Handler

    # --- runs -----------------------------------------------------------------------------
    def accept(self, alert: dict, sender: dict | None = None) -> Submission:
        engine = self.engine
        if engine.policy.dry_run and alert.get("status") != "resolved":
            rb = engine.catalog.match(alert.get("labels", {}))
            node = (alert.get("labels") or {}).get(rb.node_label) if rb else None
            if rb and node in engine.nodes:
                engine.plan(rb.name, node, {"source": "alertmanager", "labels": alert["labels"],
                                            **({"sender": sender} if sender else {})})
                return Submission("dry_run", "policy.dry_run: planned and audited, nothing changed", rb.name, node)
        sub = engine.submit_alert(alert, sender)
        if sub.outcome == "started" and sub.run_id is not None:
            self._dispatch(sub.run_id)
        return sub

    def _dispatch(self, run_id: int) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            if run_id in self._executing or len(self._threads) >= self.max_workers:
                return  # the scanner retries it
            self._executing.add(run_id)
            t = threading.Thread(target=self._execute, args=(run_id,), name=f"run-{run_id}", daemon=True)
            self._threads.append(t)
        t.start()

    def _execute(self, run_id: int) -> None:
        try:
            before = self.engine.state.get_run(run_id)
            if before.status == "running" and before.owner:
                self.log(f"run {run_id} {before.runbook} on {before.node}: resuming after its executor "
                         f"({before.owner}) died")
            run = self.engine.execute(run_id)
            # A run waiting for approval is re-checked every scan: log only what changed.
            if run.status != before.status or run.status != "awaiting_approval":
                self.log(f"run {run_id} {run.runbook} on {run.node}: {run.status}"
                         + (f" ({run.error})" if run.error else ""))
        except Exception as exc:  # the executor thread must report, not vanish
            self.log(f"run {run_id}: executor error: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._executing.discard(run_id)

    def _scan(self) -> None:
        while not self.engine.stop.is_set():
            try:
                for run_id in self.engine.runnable():
                    with self._lock:
                        busy = run_id in self._executing
                    if not busy:
                        self._dispatch(run_id)
            except Exception as exc:
                self.log(f"scanner error: {type(exc).__name__}: {exc}")
            self.engine.stop.wait(self.scan_interval_s)

    def serve_forever(self) -> None:
        scanner = threading.Thread(target=self._scan, name="scanner", daemon=True)
        scanner.start()
        self.log(f"listening on {self.scheme}://{self.httpd.server_address[0]}:{self.port}/alerts")
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.engine.stop.set()
            scanner.join(timeout=5)
            self.httpd.server_close()

    def shutdown(self) -> None:
        self.engine.stop.set()
        self.httpd.shutdown()
