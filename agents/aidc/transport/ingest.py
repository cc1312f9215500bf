"""The controller's side: receive fault events from node agents over HTTPS with mutual TLS.

Only a client certificate from the configured CA gets past the handshake. A node may report
only its own faults: every event's node must be the certificate's common name or one of its
DNS subjectAltNames, unless the certificate's name is on the allowed list (a relay); anything
else is refused with 403, logged and audited. A valid batch is inserted under its idempotency
keys (INSERT OR IGNORE) and committed before the answer, so a 200 means the events are
durable, and a batch sent again after a lost answer changes nothing. The failover loop picks
the new events up from the store like any other.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

from aidc.audit.log import AuditLog, default_actor
from aidc.runbook.receiver import _WebhookServer
from aidc.runbook.tls import TLSConfig, peer_identity
from aidc.store import Store
from aidc.transport import wire


def peer_names(sock) -> set[str]:
    """The names a verified client certificate vouches for: its CN and its DNS subjectAltNames."""
    cert = sock.getpeercert() if hasattr(sock, "getpeercert") else None
    if not cert:
        return set()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    return names


class Refused(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class IngestServer:
    """`serve_forever()` on a thread; `shutdown()` from another. Store and audit log are its own
    connections (SQLite connections are not shared across threads here), used one request at a
    time: SQLite serializes writers anyway."""

    def __init__(self, store_path, audit_path, nodes: set[str], tls: TLSConfig, host: str, port: int, *,
                 allowed_clients: set[str] = frozenset(), request_timeout_s: float = 10.0, log=None):
        if not tls.mutual:
            raise ValueError("the event listener needs mutual TLS (--client-ca): agents are known by their certificates")
        self.nodes, self.allowed_clients = set(nodes), set(allowed_clients)
        self.request_timeout_s = request_timeout_s
        self.log = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} aidc failover: {line}",
                                               file=sys.stderr, flush=True))
        self.actor = default_actor("failover-ingest")
        self._lock = threading.Lock()
        self._connections: set = set()  # open keep-alive connections, closed at shutdown
        self._conn_lock = threading.Lock()
        self.store, self.audit = Store(store_path), AuditLog(audit_path)
        self.httpd = _WebhookServer((host, port), self._handler_class(), tls.server_context(), self.log)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.log(f"receiving fault events on https://{self.httpd.server_address[0]}:{self.port}{wire.PATH}")
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.httpd.server_close()
            with self._lock:
                self.store.close()
                self.audit.close()

    def shutdown(self) -> None:
        """Stop accepting and end the open connections: an agent must not keep talking to a
        listener whose store is closed."""
        self.httpd.shutdown()
        with self._conn_lock:
            for sock in list(self._connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # --- one batch ----------------------------------------------------------------------------
    def accept(self, batch: list[tuple[str, object]], names: set[str], client: str) -> dict:
        """Check who may report what, then store the new events durably. Returns the answer."""
        relay = bool(names & self.allowed_clients)
        for key, event in batch:
            if event.node not in self.nodes:
                raise Refused(422, f"{event.node!r} is not a node of this cluster")
            if not relay and event.node not in names:
                reason = f"certificate {client} may not report faults of node {event.node!r}"
                with self._lock:
                    self.audit.append("transport.refused", reason, actor=self.actor, node=event.node,
                                      payload={"client": client, "key": key, "kind": event.kind.value})
                raise Refused(403, reason)
        accepted, duplicates = [], []
        with self._lock:
            with self.store.transaction():
                for key, event in batch:
                    if self.store.has_key(key):
                        duplicates.append(key)
                        continue
                    # Audited before the commit it describes: a crash may repeat the record, not lose it.
                    self.audit.append("transport.received", event.message, actor=self.actor, node=event.node,
                                      payload={"key": key, "client": client, "kind": event.kind.value,
                                               "action": event.action.value, "xid": event.xid,
                                               "observed_at": event.observed_at})
                    self.store.ingest(key, event)
                    accepted.append(key)
        return {"accepted": accepted, "duplicates": duplicates}

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: an agent reuses its connection
            timeout = server.request_timeout_s
            server_version = "aidc-failover"

            def log_message(self, fmt, *args):
                pass

            def setup(self):
                super().setup()
                with server._conn_lock:
                    server._connections.add(self.connection)

            def finish(self):
                with server._conn_lock:
                    server._connections.discard(self.connection)
                super().finish()

            def _respond(self, code: int, body: dict, note: str | None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                if note:
                    who = self.client_address[0] + f" ({peer_identity(self.connection) or 'no certificate'})"
                    server.log(f"{code} {self.command} {self.path} from {who}: {note}")

            def do_GET(self):
                if self.path == "/healthz":
                    return self._respond(200, {"ok": True}, None)
                self.close_connection = True
                self._respond(404, {"error": "not found"}, "unknown path")

            def do_POST(self):
                try:
                    result = self._post()
                    note = (f"{len(result['accepted'])} new, {len(result['duplicates'])} already here"
                            if result["duplicates"] else None)  # the audit log records every new event
                    self._respond(200, result, note)
                except Refused as exc:
                    self.close_connection = True
                    self._respond(exc.code, {"error": exc.reason}, exc.reason)
                except Exception as exc:  # never let a request kill the listener
                    self.close_connection = True
                    self._respond(500, {"error": "internal error"}, f"internal error: {type(exc).__name__}: {exc}")

            def _post(self) -> dict:
                if self.path != wire.PATH:
                    raise Refused(404, f"unknown path {self.path}")
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise Refused(411, "Content-Length required")
                if int(length) > wire.MAX_BODY_BYTES:
                    raise Refused(413, f"payload of {length} bytes exceeds {wire.MAX_BODY_BYTES}")
                try:
                    body = self.rfile.read(int(length))
                except TimeoutError:
                    raise Refused(408, f"body not received within {self.timeout:g} s") from None
                if len(body) < int(length):
                    raise Refused(400, f"body ended after {len(body)} of {length} bytes")
                try:
                    batch = wire.decode(body)
                except wire.WireError as exc:
                    raise Refused(400, str(exc)) from None
                names = peer_names(self.connection)
                return server.accept(batch, names, peer_identity(self.connection) or "without a name")

        return Handler
