"""The health API: read-only HTTP on the controller's event listener (aidc.transport.ingest).

    GET /v1/fleet                        the fleet-health figure, per pool, and counts
    GET /v1/nodes                        every node: health, scheduler state, open events
    GET /v1/nodes/{node}                 one node: its GPUs, open events, quarantine, certificate
    GET /v1/nodes/{node}/gpus/{index}    one GPU
    GET /v1/openapi                      the contract (data/fleet_api.openapi.yaml) as JSON

Who may call: the listener's mutual TLS lets no one without a client certificate of its CA past
the handshake; a bearer token (a token map, aidc.identity) adds `token:<name>` to `cert:<CN>`,
and a token that is presented but unknown is 401. With access roles (the installation's, else
the spec's `access.roles`) the caller needs `viewer`; a refusal is 403, audited as
`access.refused` with repeats aggregated (aidc.runbook.refusals). Nothing here writes state.
"""

from __future__ import annotations

import threading
import time
from importlib import resources
from urllib.parse import unquote

import yaml

from aidc.errors import AuditError, PolicyRefusal
from aidc.fleet import views
from aidc.fleet.figure import LiveFigure
from aidc.identity import authorize, cert_identity, token_identity
from aidc.runbook.http_server import Request, Response
from aidc.runbook.refusals import AggregatedRefusals

PREFIX = "/v1/"
OPENAPI_FILE = "data/fleet_api.openapi.yaml"
AUTH_EXPECTED = "expected 'Authorization: Bearer <token>' with a token of the listener's token map, or none"


def openapi_document() -> dict:
    return yaml.safe_load(resources.files("aidc").joinpath(OPENAPI_FILE).read_text())


class HealthApi:
    """Answers GET /v1/... from the listener's store and audit log."""

    def __init__(self, spec, store_path, audit_path, refusal_log, roles: dict[str, str],
                 token_map: dict[str, str] | None = None, clock=time.time):
        """Reads through connections of its own (a read-only audit log), under a lock of its own,
        so a slow answer (a certificate verifies the whole log) never holds up the agents'
        events on the same listener; refusals go to `refusal_log`, the listener's writer."""
        from aidc.audit.log import AuditLog
        from aidc.store import Store

        self.spec, self.roles, self.token_map, self.clock = spec, dict(roles), dict(token_map or {}), clock
        # Paths open SQLite; callables open the connections themselves (PostgreSQL: aidc.state).
        self.store = store_path() if callable(store_path) else Store(store_path)
        self.audit = audit_path() if callable(audit_path) else AuditLog(audit_path, read_only=True)
        self.lock = threading.Lock()
        self.live = LiveFigure(spec)
        self.refusals = AggregatedRefusals(refusal_log)

    @staticmethod
    def wants(request: Request) -> bool:
        """GETs under /v1/; the agents' POST /v1/events stays the listener's own."""
        return request.method == "GET" and request.path.startswith(PREFIX)

    def identities(self, request: Request) -> list[str] | None:
        """cert:<CN>, and token:<name> for a valid bearer token; None when a token is presented
        but not valid (or not a bearer token)."""
        found = [i for i in (cert_identity(request.peer),) if i]
        presented = request.header("authorization")
        if not presented:
            return found
        scheme, _, value = presented.partition(" ")
        named = token_identity(value.strip(), None, self.token_map) if scheme.lower() == "bearer" else None
        return found + [named] if named else None

    def check_head(self, request: Request) -> Response | None:
        """On the I/O thread, before any body: authentication (cheap checks only)."""
        if self.identities(request) is None:
            return Response(401, {"error": f"wrong bearer token: {AUTH_EXPECTED}"}, "unauthenticated",
                            {"WWW-Authenticate": 'Bearer realm="aidc-health"'})
        return None

    def handle(self, request: Request) -> Response:
        """On a worker thread: the role (a refusal is an audit write), then the route."""
        who = self.identities(request) or []
        self.refusals.flush_due()
        try:
            authorize(self.roles, who, "viewer", "read fleet health", self.refusals,
                      payload={"address": request.client, "method": request.method, "path": request.path[:200]})
        except PolicyRefusal as exc:
            return Response(403, {"error": str(exc)}, f"refused: {exc}")
        path = request.path.partition("?")[0]
        parts = [unquote(p) for p in path[len(PREFIX):].split("/")]
        try:
            with self.lock:
                body = self._route(parts)
        except views.NotFound as exc:
            return Response(404, {"error": str(exc)}, str(exc))
        if body is None:
            return Response(404, {"error": f"not found: {path[:200]} (see GET /v1/openapi)"}, "unknown path")
        return Response(200, body, path[:200])

    def _route(self, parts: list[str]) -> dict | None:
        if parts == ["openapi"]:
            return openapi_document()
        replay = self.live.catch_up(self.audit)
        if parts == ["fleet"]:
            return views.fleet_view(replay, self.clock(), self.store)
        if parts == ["nodes"]:
            return {"nodes": [views.node_summary(self.store, s) for s in replay.standings.values()]}
        if len(parts) == 2 and parts[0] == "nodes":
            return views.node_view(replay, self.store, parts[1], self._certificate)
        if len(parts) == 4 and parts[0] == "nodes" and parts[2] == "gpus":
            if not parts[3].isdigit() or len(parts[3]) > 3:
                raise views.NotFound(f"GPU index {parts[3][:20]!r} is not a number")
            return views.gpu_view(replay, self.store, parts[1], int(parts[3]), self._certificate)
        return None

    def _certificate(self, node: str) -> tuple[dict | None, str | None]:
        """The node's last burn-in certificate, signed with the audit log's key (verifiable with
        `aidc burnin certificate verify --public-key` and `aidc kms public-key`)."""
        from aidc.audit.log import configured_signer
        from aidc.burnin.certificate import export_certificate

        try:
            signer = configured_signer(self.audit.path)
        except AuditError as exc:
            return None, str(exc)
        if signer is None:
            return None, f"the audit log {self.audit.path.name} names no signing key: certificates cannot be signed"
        try:
            return export_certificate(self.audit, node, signer), None
        except AuditError as exc:
            return None, str(exc)
        finally:
            signer.close()

    def close(self) -> None:
        self.refusals.close()
        with self.lock:
            self.store.close()
            self.audit.close()
