"""`aidc runbook serve`: the Alertmanager webhook receiver.

Requests are checked in the cheapest order (framing and authentication as soon as the head
is in, then size, then JSON), answered with a 4xx and one log line when bad, and never crash
the server. Connections, deadlines and framing are `aidc.runbook.http_server`'s: a slow or
hostile client costs a socket, never a thread, and is cut off at its deadline. Accepted alerts
become runs through the engine (which deduplicates, under dry-run too); runs execute on worker
threads, and a scanner picks up runs nobody executes: after a restart (crash recovery), after
an approval, or when all workers were busy.

Authentication is a bearer token (`Authorization: Bearer <token>`, the scheme in any case, as
RFC 7235 has it), mutual TLS (`aidc.runbook.tls`), or both; a receiver with neither refuses to
start. What authenticated is the caller's identity (aidc.identity): `cert:<CN>` of the client
certificate, `token:<name>` of a token in the token map (`token:default` for the single token);
it is written into each run's trigger, and with access roles configured it must hold `viewer`
to list runs and `operator` to post alerts (else 403, audited, repeats aggregated by
`aidc.runbook.refusals`). A token in the query string is
refused (400) and never logged: query strings end up in proxies' and servers' logs.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from aidc import strict_json
from aidc.identity import authorize, cert_identity, role_of, token_identity
from aidc.errors import PolicyRefusal
from aidc.runbook.engine import Engine, Submission
from aidc.runbook.http_server import BoundedHTTPServer, Request, Response, ServerLimits
from aidc.runbook.refusals import AggregatedRefusals
from aidc.probes import DEFAULT_STALL_AFTER_S, PROBE_PATHS, Probe
from aidc.runbook.serve_metrics import CONTENT_TYPE_LATEST, JsonLines, ReceiverMetrics
from aidc.runbook.tls import TLSConfig

WEBHOOK_PATHS = ("/", "/alerts", "/api/v1/alerts")
AUTH_EXPECTED = "expected 'Authorization: Bearer <token>' (the scheme in any case)"
# The Alertmanager webhook fields the engine reads, when present, must be strings.
STRING_FIELDS = ("status", "fingerprint", "startsAt", "endsAt", "generatorURL")
# Query parameters that carry credentials in some APIs: refused outright, so that no client
# gets used to sending them where logs keep them.
CREDENTIAL_PARAMS = ("token", "access_token", "auth", "bearer", "password", "apikey", "api_key", "key")


@dataclass(frozen=True)
class Limits(ServerLimits):
    # Alerts in one notification; more is 413 (Alertmanager: set `max_alerts` in webhook_configs
    # to this or less, and it sends the rest as `truncatedAlerts`).
    max_alerts: int = 1000

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.max_alerts, int) or self.max_alerts < 1:
            raise ValueError(f"max_alerts must be a positive integer, not {self.max_alerts!r}")


MAX_BODY_BYTES = Limits.max_body_bytes


class BadRequest(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def validate_payload(body: bytes, max_alerts: int = Limits.max_alerts) -> list[dict]:
    """The alerts of an Alertmanager webhook (version 4) payload, or BadRequest (400, or 413 over max_alerts).

    Strict JSON (no NaN or Infinity: a stored one would break every JSON listing it is in);
    each alert an object with string labels, its other fields the engine reads strings."""
    try:
        doc = strict_json.loads(body)
    except RecursionError:  # deeply nested arrays or objects: no real notification looks like that
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("alerts"), list):
        raise BadRequest(400, "expected an Alertmanager webhook object with an 'alerts' list")
    alerts = doc["alerts"]
    if len(alerts) > max_alerts:
        raise BadRequest(413, f"{len(alerts)} alerts in one notification; at most {max_alerts} "
                              f"(set max_alerts: {max_alerts} in Alertmanager's webhook_configs)")
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise BadRequest(400, f"alerts[{i}]: expected an object with a 'labels' object")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in alert["labels"].items()):
            raise BadRequest(400, f"alerts[{i}].labels: expected string keys and values")
        for name in STRING_FIELDS:
            if name in alert and alert[name] is not None and not isinstance(alert[name], str):
                raise BadRequest(400, f"alerts[{i}].{name}: expected a string")
    return alerts


class Receiver:
    def __init__(self, engine: Engine, token: str | None, host: str = "127.0.0.1", port: int = 9097,
                 max_workers: int = 8, scan_interval_s: float = 1.0, log=None, tls: TLSConfig | None = None,
                 limits: Limits | None = None, token_map: dict[str, str] | None = None, log_format: str = "json",
                 stall_after_s: float = DEFAULT_STALL_AFTER_S):
        if not token and not token_map and not (tls and tls.mutual):
            raise ValueError("authentication is required: a bearer token, or mutual TLS (a client CA)")
        self.engine, self.token, self.tls = engine, token or None, tls
        self.token_map = dict(token_map or {})  # {sha256 hex of a token: its name}
        self.max_workers, self.scan_interval_s = max_workers, scan_interval_s
        self.limits = limits or Limits()
        # A log given (tests, embedders) gets text lines; otherwise JSON lines on stderr, which
        # log shippers parse without a regex (log_format="text" for people at a terminal).
        self.structured = log is None and log_format == "json"
        self.log = log or (JsonLines("aidc.runbook.serve") if self.structured else (
            lambda line: print(f"{time.strftime('%H:%M:%S')} aidc runbook serve: {line}", file=sys.stderr,
                               flush=True)))
        self.metrics = ReceiverMetrics(lambda: self.httpd.open_connections,
                                       lambda: dict(self.httpd.connection_refusals))
        # 403s reach the audit log aggregated: a caller refused 65 times a second is two
        # records a minute, not 3 GB a day (aidc.runbook.refusals).
        self.refusals = AggregatedRefusals(engine.audit)
        # /healthz: the scanner (which starts every run) turned recently; /readyz: the catalog
        # is loaded and the run state open (the engine has both), and the scanner has turned.
        self.probe = Probe("runbook-receiver", stall_after_s)
        self._executing: set[int] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        context = tls.server_context() if tls else None
        self.httpd = BoundedHTTPServer((host, port), self.limits, context, self._check_head, self._handle, self.log,
                                       on_response=self._on_response,
                                       known_peer=self._known_peer if tls and tls.mutual else None)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def open_connections(self) -> int:
        return self.httpd.open_connections

    # --- HTTP -----------------------------------------------------------------------------
    def identities(self, request: Request) -> list[str] | None:
        """Who the request authenticated as (certificate first, then token); None: not authenticated."""
        found = [i for i in (cert_identity(request.peer),) if i]
        if self.token is None and not self.token_map:
            return found  # mutual TLS only: the handshake already verified the client
        scheme, _, presented = request.header("authorization").partition(" ")
        named = token_identity(presented.strip(), self.token, self.token_map) if scheme.lower() == "bearer" else None
        return found + [named] if named else None

    def _known_peer(self, peer: str | None, names: frozenset) -> bool:
        """A verified client certificate that may use the connections kept for known identities:
        with access roles configured, one that holds a role; without, any the client CA signed."""
        identity = cert_identity(peer)
        roles = self.engine.access_roles
        return identity is not None and (not roles or role_of(roles, [identity]) is not None)

    def _check_head(self, request: Request) -> Response | None:
        """Before any body is read: health needs nothing, everything else the token and a known route."""
        path, _, query = request.path.partition("?")
        params = {p.partition("=")[0].lower() for p in query.split("&") if p}
        if params & set(CREDENTIAL_PARAMS):
            return Response(400, {"error": f"credentials in the query string are refused (they end up in logs): "
                                           f"{AUTH_EXPECTED}"}, "credentials in the query string refused")
        if request.method == "GET" and request.path in ("/metrics", *PROBE_PATHS):
            return None  # counts only, no names or secrets: scraped like any exporter
        if self.identities(request) is None:
            return Response(401, {"error": f"missing or wrong bearer token: {AUTH_EXPECTED}"}, "unauthenticated",
                            {"WWW-Authenticate": 'Bearer realm="aidc-runbook"'})
        routes = {"GET": ("/runs",), "POST": WEBHOOK_PATHS}
        if request.method not in routes:
            return Response(405, {"error": f"method {request.method} not allowed"}, "method not allowed",
                            {"Allow": "GET, POST"})
        if request.path not in routes[request.method]:
            return Response(404, {"error": "not found"}, f"unknown path {path[:200]}")
        return None

    def _handle(self, request: Request) -> Response:
        if request.path in PROBE_PATHS:
            code, body = self.probe.healthz() if request.path == "/healthz" else self.probe.readyz()
            return Response(code, {**body, "ok": code == 200}, request.path.lstrip("/"))
        if request.path == "/metrics":
            return Response(200, {}, "metrics", text=self.metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
        # Roles here, on a worker thread: a refusal is audited (a database write), which the
        # I/O thread that runs _check_head must not wait for.
        who = self.identities(request) or []
        needed, action = ("viewer", "list runs") if request.method == "GET" else ("operator", "post alerts")
        try:
            authorize(self.engine.access_roles, who, needed, action, self.refusals,
                      payload={"address": request.client, "method": request.method, "path": request.path})
        except PolicyRefusal as exc:
            return Response(403, {"error": str(exc)}, f"refused: {exc}")
        if request.method == "GET":  # /runs: _check_head allowed nothing else
            runs = [r.to_dict() for r in self.engine.state.runs()]
            return Response(200, {"runs": runs}, f"{len(runs)} runs")
        try:
            alerts = validate_payload(request.body, self.limits.max_alerts)
        except BadRequest as exc:
            return Response(exc.code, {"error": exc.reason}, exc.reason)
        sender = {"address": request.client, **({"client": request.peer} if request.peer else {}),
                  **({"identity": who[-1], "identities": who} if who else {})}
        results = [self._accept_one(a, sender) for a in alerts]
        summary = ", ".join(f"{r.outcome}:{r.runbook or '-'}@{r.node or '-'}" for r in results[:20]) or "no alerts"
        if len(results) > 20:
            summary += f", ... ({len(results)} alerts)"
        # Each alert is answered on its own. An alert the engine refused (a label that fails its
        # runbook's types: `rejected`) is a 200 like the rest, since Alertmanager retries a 5xx
        # and a retry cannot change a label. Only an internal error (`error`: a database, say)
        # makes the answer 500, so that Alertmanager retries: the alerts already handled come
        # back as duplicates, and the failed one gets another chance.
        code = 500 if any(r.outcome == "error" for r in results) else 200
        return Response(code, {"results": [r.to_dict() for r in results]}, summary)

    def _accept_one(self, alert: dict, sender: dict) -> Submission:
        try:
            return self.accept(alert, sender)
        except Exception as exc:  # this alert's failure, not the notification's
            self.metrics.alert("error")
            return Submission("error", f"internal error: {type(exc).__name__}: {exc}")

    def _on_response(self, request: Request | None, who: str, response: Response, line: str) -> None:
        route = request.path.partition("?")[0] if request else "-"
        self.metrics.answered(request.method if request else "-", route, response.code)
        if route in ("/metrics", *PROBE_PATHS) and response.code == 200:
            return  # a scrape every few seconds is not news
        if self.structured:
            self.log(line, status=response.code, method=request.method if request else None, path=route,
                     client=who, note=response.note)
        else:
            self.log(line)

    # --- runs -----------------------------------------------------------------------------
    def accept(self, alert: dict, sender: dict | None = None) -> Submission:
        sub = self.engine.submit_alert(alert, sender)  # under policy.dry_run: planned once, never started
        self.metrics.alert(sub.outcome)
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
            if run.status != before.status and run.status in ("done", "failed"):
                self.metrics.run_finished(run.status)
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
                self.refusals.flush_due()
                self.engine.refusals.flush(expired_only=True)  # a flood's summary, once it is over
            except Exception as exc:
                self.log(f"scanner error: {type(exc).__name__}: {exc}")
            else:  # a scanner failing every turn is not a live one
                self.probe.ready(runbooks=len(self.engine.catalog.runbooks))
                self.probe.turned()
            self.engine.stop.wait(self.scan_interval_s)

    def serve_forever(self) -> None:
        scanner = threading.Thread(target=self._scan, name="scanner", daemon=True)
        scanner.start()
        self.log(f"listening on {self.scheme}://{self.httpd.server_address[0]}:{self.port}/alerts")
        try:
            self.httpd.serve_forever()
        finally:
            self.engine.stop.set()
            scanner.join(timeout=5)
            # Executors stop at their next step boundary; wait for them (bounded) so whoever
            # closes the engine's databases next does not pull them from under a running step.
            deadline = time.monotonic() + 10
            with self._lock:
                running = list(self._threads)
            for t in running:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            self.refusals.close()
            self.engine.refusals.flush()

    def shutdown(self) -> None:
        self.engine.stop.set()
        self.httpd.shutdown()
        self.refusals.close()  # the refusals counted in open windows are on record when this returns
