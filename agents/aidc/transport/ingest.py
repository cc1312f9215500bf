"""The controller's side: receive fault events from node agents over HTTPS with mutual TLS.

Only a client certificate from the configured CA gets past the handshake. A node may report
only its own faults: every event's node must be the certificate's common name or one of its
DNS subjectAltNames, or a node the spec lists for a relay the certificate names (`relays`,
from `transport.relays` for the names given with `--allow-client`); a batch with any other node
is refused whole with 403, logged and audited once (aidc.failover.provenance). An event for a
name that is not one of the scheduler's nodes is refused with 422 and audited, aggregated
(aidc.nodenames). A valid batch is inserted under its idempotency keys (INSERT OR IGNORE) and
committed before the answer, so a 200 means the events are durable, and a batch sent again
after a lost answer changes nothing. The failover loop picks the new events up from the store
like any other, woken by `on_ingest` when it runs in the same process.

With `spec` given, the listener also serves the read-only health API (aidc.fleet.api,
`GET /v1/...`) to the same mutual-TLS clients, with `roles` (viewer suffices) and an optional
bearer-token map.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Mapping

from aidc.audit.log import AuditLog, default_actor
from aidc.failover.provenance import audit_refusal, speaks_for
from aidc.nodenames import NodeInventory, RefusalLog, shown
from aidc.runbook.http_server import BoundedHTTPServer, Request, Response, ServerLimits
from aidc.runbook.tls import TLSConfig
from aidc.store import Store
from aidc.transport import wire

# The receiver's connection model (aidc.runbook.http_server): one I/O thread reads every
# connection under total deadlines, so an agent stuck mid-request, or a slow or hostile
# client, holds a socket, never a worker; connections are capped.


class Refused(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class IngestServer:
    """`serve_forever()` on a thread; `shutdown()` from another. Store and audit log are its own
    connections, used one request at a time: SQLite serializes writers anyway."""

    def __init__(self, store_path, audit_path, nodes: set[str] | NodeInventory, tls: TLSConfig, host: str,
                 port: int, *, relays: Mapping[str, Iterable[str]] | None = None, request_timeout_s: float = 10.0,
                 log=None, write_lock: threading.Lock | None = None, spec=None,
                 roles: Mapping[str, str] | None = None, token_map: Mapping[str, str] | None = None):
        if not tls.mutual:
            raise ValueError("the event listener needs mutual TLS (--client-ca): agents are known by their certificates")
        # The controller's NodeInventory (the scheduler's nodes), or a fixed set of names.
        self.nodes = nodes if isinstance(nodes, NodeInventory) else frozenset(nodes)
        self.relays = {name: frozenset(listed) for name, listed in (relays or {}).items()}
        self.request_timeout_s = request_timeout_s
        self.log = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} aidc failover: {line}",
                                               file=sys.stderr, flush=True))
        self.actor = default_actor("failover-ingest")
        # Called after each commit that stored new events: the controller in this process
        # (FailoverController.wake.set) decides them now rather than at its next poll.
        self.on_ingest = None
        # Guards this listener's store and audit connections; the controller of the same process
        # passes its own write lock, so their commits queue on one lock (FailoverController.write_lock).
        self._lock = write_lock or threading.Lock()
        # A path opens SQLite; a callable opens the connection itself (PostgreSQL: aidc.state).
        self.store = store_path() if callable(store_path) else Store(store_path)
        self.audit = audit_path() if callable(audit_path) else AuditLog(audit_path)
        self.refusals = RefusalLog(self.audit, self.actor, lock=self._lock)
        self.api = None
        if spec is not None:
            from aidc.fleet.api import HealthApi

            self.api = HealthApi(spec, store_path, audit_path, self.audit, dict(roles or {}), dict(token_map or {}))
        limits = ServerLimits(header_timeout_s=request_timeout_s, body_timeout_s=request_timeout_s,
                              max_body_bytes=wire.MAX_BODY_BYTES)
        self.httpd = BoundedHTTPServer((host, port), limits, tls.server_context(), self._check_head,
                                       self._handle, self.log)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.log(f"receiving fault events on https://{self.httpd.server_address[0]}:{self.port}{wire.PATH}")
        try:
            self.httpd.serve_forever()
        finally:
            self.refusals.flush()
            if self.api is not None:
                self.api.close()
            with self._lock:
                self.store.close()
                self.audit.close()

    def shutdown(self) -> None:
        """Stop accepting and end the open connections."""
        self.httpd.shutdown()

    # --- one batch ----------------------------------------------------------------------------
    def accept(self, batch: list[tuple[str, object]], names: set[str], client: str) -> dict:
        """Check who may report what, then store the new events durably. Returns the answer."""
        allowed = speaks_for(names, self.relays)
        self.refusals.flush(expired_only=True)
        foreign: dict[str, list[str]] = {}
        for key, event in batch:
            if event.node not in self.nodes:
                reason = f"{shown(event.node)} is not a node of this cluster"
                self.refusals.refuse(event.node, "ingest", client, reason)
                raise Refused(422, reason)
            if event.node not in allowed:
                foreign.setdefault(event.node, []).append(key)
        if foreign:
            first = next(iter(foreign))
            with self._lock:
                audit_refusal(self.audit, self.actor, "https", client, first, foreign[first], client=client,
                              nodes=sorted(foreign), events=sum(map(len, foreign.values())))
            raise Refused(403, f"certificate {client} may not report faults of node {first!r}"
                          + (f" (nor of {len(foreign) - 1} other node(s))" if len(foreign) > 1 else ""))
        accepted, duplicates = [], []
        with self._lock:
            # One store commit and one audit commit (one anchor update) per request, the audit
            # log's first: a crash between the two may repeat records, never lose one.
            with self.store.transaction(), self.audit.batch():
                for key, event in batch:
                    if self.store.ingest(key, event) is None:  # this key is here already
                        duplicates.append(key)
                        continue
                    # Audited before the store's commit (the audit batch commits first): a crash
                    # may repeat the record, not lose it.
                    self.audit.append("transport.received", event.message, actor=self.actor, node=event.node,
                                      payload={"key": key, "client": client, "kind": event.kind.value,
                                               "action": event.action.value, "xid": event.xid,
                                               "observed_at": event.observed_at})
                    accepted.append(key)
        if accepted and self.on_ingest is not None:
            self.on_ingest()
        return {"accepted": accepted, "duplicates": duplicates}

    # --- HTTP ------------------------------------------------------------------------------------
    def _check_head(self, request: Request) -> Response | None:
        """Before any body is read: the route. (Who the client is, the handshake settled.)"""
        if request.method == "GET" and request.path == "/healthz":
            return None
        if self.api is not None and self.api.wants(request):
            return self.api.check_head(request)
        if request.method != "POST":
            return Response(405, {"error": f"method {request.method} not allowed"}, "method not allowed",
                            {"Allow": "GET, POST"})
        if request.path != wire.PATH:
            return Response(404, {"error": "not found"}, f"unknown path {request.path[:200]}")
        return None

    def _handle(self, request: Request) -> Response:
        if self.api is not None and self.api.wants(request):
            try:
                return self.api.handle(request)
            except Exception as exc:  # never let a request kill the listener
                return Response(500, {"error": "internal error"}, f"internal error: {type(exc).__name__}: {exc}")
        if request.method == "GET":
            return Response(200, {"ok": True}, "health")
        try:
            try:
                batch = wire.decode(request.body)
            except wire.WireError as exc:
                raise Refused(400, str(exc)) from None
            result = self.accept(batch, set(request.peer_names), request.peer or "without a name")
        except Refused as exc:
            return Response(exc.code, {"error": exc.reason}, exc.reason)
        except Exception as exc:  # never let a request kill the listener
            return Response(500, {"error": "internal error"}, f"internal error: {type(exc).__name__}: {exc}")
        note = f"{len(result['accepted'])} new, {len(result['duplicates'])} already here"
        return Response(200, result, note)
