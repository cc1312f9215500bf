"""The agent's side: forward this node's fault events from the store (the outbox) to the controller.

The health agent keeps writing events to its local store exactly as before; this thread sends
the ones no controller holds yet, oldest first, in batches, and marks them forwarded only
after a 2xx (the controller answers after its commit). Anything else (no connection, a 5xx,
a refusal such as a certificate for the wrong node) leaves them queued, and the next try
waits a capped, jittered, exponentially growing time. Nothing is dropped: an agent restart
finds the unforwarded events in the store, and an event delivered twice (an answer lost on
the way back) is one event at the controller, which keeps them by idempotency key.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aidc.errors import AidcError
from aidc.retry import Backoff, RetryPolicy
from aidc.store import Store
from aidc.transport import wire


class TransportError(AidcError):
    """The controller did not take a batch (the message says why)."""


@dataclass(frozen=True)
class ClientTLS:
    cert_file: Path
    key_file: Path
    ca_file: Path

    def context(self) -> ssl.SSLContext:
        for what, path in (("--tls-cert", self.cert_file), ("--tls-key", self.key_file), ("--ca", self.ca_file)):
            if not Path(path).is_file():
                raise AidcError(f"{what} {path}: no such file")
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
        except ssl.SSLError as exc:
            raise AidcError(f"--ca {self.ca_file}: not a PEM CA certificate ({exc.reason or exc})") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except ssl.SSLError as exc:
            raise AidcError(f"--tls-cert {self.cert_file} / --tls-key {self.key_file}: "
                            f"not a matching PEM certificate and key ({exc.reason or exc})") from None
        return ctx


def client_tls(url: str | None, cert: Path | None, key: Path | None, ca: Path | None) -> ClientTLS | None:
    """The agent's transport options as one config: all or nothing, and https only."""
    given = [o for o, v in (("--tls-cert", cert), ("--tls-key", key), ("--ca", ca)) if v is not None]
    if url is None:
        if given:
            raise AidcError(f"{', '.join(given)} given without --controller-url")
        return None
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise AidcError(f"--controller-url {url}: expected https://HOST:PORT (events travel only over mutual TLS)")
    if len(given) != 3:
        raise AidcError("--controller-url needs --tls-cert, --tls-key and --ca (mutual TLS)")
    return ClientTLS(Path(cert), Path(key), Path(ca))


class OutboxForwarder:
    """The loop every sink shares: send this node's unforwarded events, oldest first, mark them
    forwarded once the sink took them, back off (capped, jittered) while it does not. A sink
    implements `forward_once`; a failure it reports is a TransportError."""

    sink = "the sink"  # named in the log lines

    def __init__(self, store_path: str | Path, node: str, *, batch_size: int = 100, poll_s: float = 0.05,
                 backoff_base_s: float = 0.2, backoff_max_s: float = 10.0, timeout_s: float = 10.0, log=None):
        self.node, self.store_path = node, Path(store_path)
        self.batch_size = batch_size
        self.poll_s, self.timeout_s = poll_s, timeout_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        # Full jitter over a capped exponential: agents that lost the controller together do not
        # all come back at the same instant. No limit on tries: the events wait in the store.
        self.backoff = Backoff(RetryPolicy(attempts=None, base_s=backoff_base_s, cap_s=backoff_max_s, jitter="full"))
        self.log = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} aidc agent: {line}",
                                               file=sys.stderr, flush=True))
        self.wake = threading.Event()
        self.forwarded = 0
        self.failed_tries = 0  # all of them, since start

    @property
    def failures(self) -> int:
        """Consecutive failed tries (0: the last one went through)."""
        return self.backoff.failures

    # --- the thread -------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        store: Store | None = None
        try:
            while not stop.is_set():
                try:
                    store = store or Store(self.store_path)
                    sent = self.forward_once(store)
                except (TransportError, sqlite3.Error) as exc:
                    # sqlite3.Error: the store busy or unreadable for a moment; the events stay in it.
                    self.failed_tries += 1
                    wait = self.backoff.failed()
                    if self.failures == 1 or self.failures % 10 == 0:  # first failure and then every tenth
                        self.log(f"{exc}; {self._queued(store)} event(s) queued, "
                                 f"retrying (try {self.failures}, next in {wait:.2f} s)")
                    stop.wait(wait)
                    continue
                if self.failures:
                    self.log(f"{self.sink} reachable again after {self.backoff.succeeded()} failed tries")
                if sent < self.batch_size:  # caught up: wait for new events
                    self.wake.wait(self.poll_s)
                    self.wake.clear()
        finally:
            self.close()
            if store is not None:
                store.close()

    def _queued(self, store: Store | None) -> int | str:
        try:
            return store.outbox_depth(self.node) if store is not None else "unknown"
        except sqlite3.Error:
            return "unknown"

    def forward_once(self, store: Store) -> int:
        """Send up to one batch; returns how many events the sink now holds."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds open between batches."""


class Forwarder(OutboxForwarder):
    """The HTTPS sink: POST batches to a failover controller over mutual TLS."""

    sink = "controller"

    def __init__(self, store_path: str | Path, node: str, url: str, tls: ClientTLS, *, batch_size: int = 100,
                 poll_s: float = 0.05, backoff_base_s: float = 0.2, backoff_max_s: float = 10.0,
                 timeout_s: float = 10.0, log=None):
        super().__init__(store_path, node, batch_size=min(batch_size, wire.MAX_BATCH), poll_s=poll_s,
                         backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s, timeout_s=timeout_s, log=log)
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 443
        self.context = tls.context()  # bad files are an error at start-up, not a retry loop
        self._conn: http.client.HTTPSConnection | None = None

    # --- one batch --------------------------------------------------------------------------
    def _post(self, body: bytes) -> dict:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s,
                                                     context=self.context)
        try:
            self._conn.request("POST", wire.PATH, body=body, headers={"Content-Type": "application/json"})
            resp = self._conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(f"controller https://{self.host}:{self.port} unreachable: "
                                 f"{type(exc).__name__}: {exc}") from None
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        if not 200 <= resp.status < 300:
            try:
                reason = json.loads(data).get("error", "")
            except (ValueError, AttributeError):
                reason = data[:200].decode("utf-8", "replace")
            raise TransportError(f"controller answered {resp.status}: {reason}")
        return json.loads(data)

    def forward_once(self, store: Store) -> int:
        """Send up to one batch; returns how many events the controller now holds."""
        rows = store.unforwarded(self.node, self.batch_size)
        if not rows:
            return 0
        self._post(wire.encode([(key, event) for _, key, event in rows]))
        store.mark_forwarded([event_id for event_id, _, _ in rows])
        self.forwarded += len(rows)
        return len(rows)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
