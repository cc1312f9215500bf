"""A small HTTP/1.1 server for the webhook receiver, built for slow and hostile clients.

One I/O thread multiplexes every connection (`selectors`): it runs the TLS handshake, reads
the request head and body, and holds each request to two total deadlines, however slowly the
bytes trickle in: accept to end of headers (the TLS handshake included), and end of headers
to end of body. Only a complete request reaches one of a few worker threads, so a slow client
costs a file descriptor and a small buffer, never a thread. Framing is strict: one
Content-Length, no Transfer-Encoding. Each connection carries one request and is closed after
its response (`Connection: close`).

Connections are admitted so that a crowd of hostile sockets cannot keep a known sender out:
* Each source address may hold at most `max_per_source` connections that have not
  authenticated; more are answered 503 (under TLS: closed, or the source's oldest unfinished
  handshake is dropped to make room).
* Under TLS a connection first sits in the handshake pool, under a short handshake deadline;
  only a completed handshake takes a slot in the shared pool of `max_connections`. When the
  handshake pool (as large) is full, an old handshake of the source that has held it longest
  is dropped: a flood evicts itself, not a sender's handshake in its few milliseconds.
* With client certificates (`known_peer` given), `reserved_connections` of the shared pool
  are kept for known identities: other connections may hold the rest only.
Every refusal or eviction is counted (`connection_refusals`) and logged at most once a second
per reason, with a count.
"""

from __future__ import annotations

import http
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Callable

from aidc import strict_json
from aidc.runbook.tls import certificate_names, peer_identity

# After an early refusal (401, 413, ...) the client may still be sending its body; the
# connection is kept open this long, reading and dropping, so the client reads the answer
# instead of a reset. Refused-when-full connections linger the same way, at most this many.
LINGER_S = 1.0
MAX_LINGERING_REFUSALS = 64
SWEEP_INTERVAL_S = 0.05
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SINGLE_HEADERS = ("content-length", "authorization", "host")


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = 512       # open connections past the TLS handshake; more are answered 503
    header_timeout_s: float = 10.0   # accept to end of headers, TLS handshake included
    body_timeout_s: float = 10.0     # end of headers to end of body; also bounds writing the response
    max_head_bytes: int = 16 << 10   # request line and headers; more is 431
    max_body_bytes: int = 1 << 20    # Alertmanager caps a notification's alerts; 1 MiB is far beyond a real one
    request_workers: int = 4         # threads that handle complete requests
    max_per_source: int = 64         # unauthenticated connections from one address (handshakes included)
    handshake_timeout_s: float = 3.0  # accept to a completed TLS handshake (a real one takes milliseconds)
    # Of max_connections, kept for known identities (client certificates); None: a quarter.
    reserved_connections: int | None = None

    @property
    def reserve(self) -> int:
        return self.max_connections // 4 if self.reserved_connections is None else self.reserved_connections

    def __post_init__(self):
        for name in ("max_connections", "max_head_bytes", "max_body_bytes", "request_workers", "max_per_source"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        for name in ("header_timeout_s", "body_timeout_s", "handshake_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 86400:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.reserved_connections is not None and (
                not isinstance(self.reserved_connections, int)
                or not 0 <= self.reserved_connections < self.max_connections):
            raise ValueError(f"reserved_connections must be 0 or more and less than max_connections "
                             f"({self.max_connections}), not {self.reserved_connections!r}")


class HTTPError(Exception):
    """A request the server answers with `code` and `reason` instead of handling it."""

    def __init__(self, code: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.code, self.reason, self.headers = code, reason, headers or {}


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, list[str]]  # lower-case names; every value, in order
    content_length: int | None
    body: bytes = b""
    client: str = "-"
    peer: str | None = None  # a verified client certificate's `CN=...`
    peer_names: frozenset = frozenset()  # its CN and DNS subjectAltNames

    def header(self, name: str, default: str = "") -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else default

    @property
    def who(self) -> str:
        return self.client + (f" ({self.peer})" if self.peer else "")


@dataclass
class Response:
    code: int
    body: dict
    note: str  # the log line's tail
    headers: dict[str, str] = field(default_factory=dict)
    text: str | None = None  # a plain-text body instead of JSON (Prometheus' exposition format)
    content_type: str = "application/json"

    def encode(self) -> bytes:
        data = self.text.encode() if self.text is not None else strict_json.dumps(self.body).encode()
        try:
            phrase = http.HTTPStatus(self.code).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {self.code} {phrase}", "Server: aidc-runbook", f"Date: {formatdate(usegmt=True)}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(data)}", "Connection: close",
                 *(f"{k}: {v}" for k, v in self.headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def parse_head(data: bytes) -> Request:
    """The request line and headers (up to, not including, the blank line), or HTTPError.

    Strict where leniency lets two parties read one request differently: a repeated
    Content-Length, Authorization or Host, a Content-Length that is not plain digits, any
    Transfer-Encoding (which this server does not implement), folded or malformed lines."""
    text = data.decode("latin-1")
    lines = re.split(r"\r?\n", text)
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or any(c.isspace() for c in parts[1]):
        raise HTTPError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if not re.fullmatch(r"HTTP/\d\.\d", version):
        raise HTTPError(400, f"malformed HTTP version {version[:20]!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HTTPError(505, f"{version} is not supported; send HTTP/1.1")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):  # also a folded line (leading space) or a space before ':'
            raise HTTPError(400, f"malformed header line {line[:80]!r}")
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
            raise HTTPError(400, f"control character in header {name}")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    for name in _SINGLE_HEADERS:
        if len(headers.get(name, ())) > 1:
            raise HTTPError(400, f"more than one {name.title()} header")
    length = None
    if "content-length" in headers:
        value = headers["content-length"][0]
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise HTTPError(400, f"bad Content-Length {value[:40]!r}: expected one decimal number")
        length = int(value)
    if "transfer-encoding" in headers:
        if length is not None:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length: ambiguous framing, refused")
        raise HTTPError(501, "Transfer-Encoding is not supported; send the body with a Content-Length")
    return Request(method, target, version, headers, length)


def _has_bytes(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError, OSError):
        return False


class _Conn:
    """One client connection as the I/O thread sees it."""

    __slots__ = ("sock", "client", "phase", "deadline", "buf", "request", "slot", "known", "accepted", "heard",
                 "peer", "peer_names", "scanned")

    def __init__(self, sock, client: str, phase: str, deadline: float, slot: str | None, accepted: float):
        self.sock, self.client, self.phase, self.deadline = sock, client, phase, deadline
        self.slot = slot  # "handshake", "pool", or None (a refusal lingering: it counts nowhere)
        self.known = False  # a client certificate of a known identity (known_peer)
        self.accepted = accepted
        self.heard = False  # in a TLS handshake: the client has sent something (a real one at once)
        self.buf = bytearray()
        self.request: Request | None = None
        self.peer: str | None = None
        self.peer_names: frozenset = frozenset()
        self.scanned = 0  # bytes of buf already searched for the end of the head


# Why a connection was refused or dropped before its request: the keys of connection_refusals.
CONNECTION_REFUSALS = ("busy", "per_source", "handshake_evicted", "handshake_timeout")


class BoundedHTTPServer:
    """Serve `handle(request) -> Response` under `limits`.

    `check_head(request) -> Response | None` runs on the I/O thread as soon as the head is
    in, before any body is read: a refusal there (authentication, routing) costs no body.
    `known_peer(peer, peer_names) -> bool` says whether a verified client certificate is a
    known identity, which may use the `reserved_connections`; None: no reserve."""

    def __init__(self, address: tuple[str, int], limits: ServerLimits, ssl_context: ssl.SSLContext | None,
                 check_head: Callable[[Request], Response | None], handle: Callable[[Request], Response],
                 log: Callable[[str], None],
                 on_response: Callable[[Request | None, str, Response, str], None] | None = None,
                 known_peer: Callable[[str | None, frozenset], bool] | None = None):
        # on_response(request, who, response, line): told of every answer instead of `log` (its
        # owner counts and logs it, structured); `line` is what `log` would have been given.
        self.limits, self.ssl_context, self.check_head, self.handle, self.log = (
            limits, ssl_context, check_head, handle, log)
        self.on_response, self.known_peer = on_response, known_peer
        self.reserve = limits.reserve if known_peer is not None else 0
        self.connection_refusals = Counter({reason: 0 for reason in CONNECTION_REFUSALS})  # ever, by reason
        # The backlog holds connections the I/O thread has not accepted yet; a deep one keeps a
        # sender's SYN from being dropped (a second's retransmit) while a flood is being shed.
        self.listener = socket.create_server(address, backlog=1024)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}  # fd -> connection, owned by the I/O thread
        self._handshaking: dict[str, list[_Conn]] = {}  # source -> its handshakes, oldest first (I/O thread)
        self._silent: Counter = Counter()  # source -> its handshakes that have sent nothing yet (I/O thread)
        # Counted under _open_lock (workers release pool slots): the shared pool, the part of it
        # without a known identity, the handshake pool, and per source the connections without one.
        self._pool = self._pool_unknown = self._handshakes = 0
        self._unknown_by_source: dict[str, int] = {}
        self._open_lock = threading.Lock()
        self._work: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._refusals_unlogged: Counter = Counter()
        self._refusal_logged_at: dict[str, float] = {}

    @property
    def open_connections(self) -> int:
        """Connections held now: in the shared pool and in TLS handshakes."""
        with self._open_lock:
            return self._pool + self._handshakes

    # --- the I/O thread ------------------------------------------------------------------------
    def serve_forever(self) -> None:
        workers = [threading.Thread(target=self._worker, name=f"http-worker-{i}", daemon=True)
                   for i in range(self.limits.request_workers)]
        for t in workers:
            t.start()
        self._selector.register(self.listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sweep = 0.0
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(timeout=SWEEP_INTERVAL_S):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._on_ready(key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_INTERVAL_S
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            for _ in workers:
                self._work.put(None)
            for t in workers:
                t.join(timeout=5)
            self._selector.close()
            self.listener.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stopped.wait(timeout=10)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        for _ in range(64):  # bounded: let the sweep run even under a connection flood
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: the next select retries
                self.log(f"accept failed: {exc.strerror or exc}")
                return
            sock.setblocking(False)
            now, source = time.monotonic(), address[0]
            if self.ssl_context is None:
                refusal = self._admit_to_pool(source)
                if refusal:
                    self._refuse_connection(sock, source, refusal, now)
                    continue
                conn = _Conn(sock, source, "head", now + self.limits.header_timeout_s, "pool", now)
            else:
                if not self._make_room_for_handshake(source, now):
                    self._refuse_connection(sock, source, "per_source", now)
                    continue
                said_hello = _has_bytes(sock)  # a real client's ClientHello follows its connect at once
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError) as exc:
                    self.log(f"TLS setup failed for {source}: {exc}")
                    sock.close()
                    continue
                deadline = now + min(self.limits.handshake_timeout_s, self.limits.header_timeout_s)
                conn = _Conn(sock, source, "handshake", deadline, "handshake", now)
                with self._open_lock:
                    self._handshakes += 1
                    self._unknown_by_source[source] = self._unknown_by_source.get(source, 0) + 1
                self._handshaking.setdefault(source, []).append(conn)
                self._silent[source] += 1
                if said_hello:
                    self._heard(conn)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _admit_to_pool(self, source: str, known: bool = False, handshaken: bool = False) -> str | None:
        """Take a slot in the shared pool (None), or say why not ("busy", "per_source").
        `handshaken`: the connection leaves the handshake pool, where it was already counted
        against its source."""
        limits = self.limits
        with self._open_lock:
            if handshaken:
                self._handshakes -= 1
            here = self._unknown_by_source.get(source, 0)
            if self._pool >= limits.max_connections or (
                    not known and self._pool_unknown >= limits.max_connections - self.reserve):
                refusal = "busy"
            elif not known and not handshaken and here >= limits.max_per_source:
                refusal = "per_source"
            else:
                refusal = None
                self._pool += 1
                self._pool_unknown += not known
            # Per source, the connections without a known identity (a handshake counts as one).
            if handshaken and (known or refusal):
                here -= 1
            elif not handshaken and refusal is None and not known:
                here += 1
            if here:
                self._unknown_by_source[source] = here
            else:
                self._unknown_by_source.pop(source, None)
        return refusal

    def _make_room_for_handshake(self, source: str, now: float) -> bool:
        """Make room in the handshake pool for one more from `source`; False: its unauthenticated
        connections are all past the handshake, and at --max-per-source."""
        with self._open_lock:
            at_source = self._unknown_by_source.get(source, 0) >= self.limits.max_per_source
            full = self._handshakes >= self.limits.max_connections
        if at_source:
            mine = self._handshaking.get(source)
            if not mine:
                return False
            self._evict(next((c for c in mine if not c.heard), mine[0]), now)
        elif full:
            self._evict(self._eviction_victim(), now)
        return True

    def _eviction_victim(self) -> _Conn:
        """The handshake to drop for a new one: first one that has sent nothing (a real TLS client
        sends its ClientHello with its connect), from the source with the most such; else the
        oldest of the source with the most handshakes. A flood, from a few addresses or many,
        evicts itself; a sender's handshakes are few, heard at once and done in milliseconds."""
        silent = [(n, src) for src, n in self._silent.items() if n > 0]
        if silent:
            _, source = max(silent)
            return next(c for c in self._handshaking[source] if not c.heard)
        return max(self._handshaking.values(), key=len)[0]

    def _heard(self, conn: _Conn) -> None:
        if not conn.heard:
            conn.heard = True
            self._silent[conn.client] -= 1
            if self._silent[conn.client] <= 0:
                del self._silent[conn.client]

    def _evict(self, conn: _Conn, now: float) -> None:
        self._note_refusal("handshake_evicted", conn.client, now)
        self._close(conn)

    def _note_refusal(self, reason: str, client: str, now: float) -> None:
        """Count a refused or dropped connection; log at most one line a second per reason."""
        self.connection_refusals[reason] += 1
        self._refusals_unlogged[reason] += 1
        if now - self._refusal_logged_at.get(reason, -1.0) < 1.0:
            return
        n, limits = self._refusals_unlogged.pop(reason), self.limits
        self._refusal_logged_at[reason] = now
        kept = f"; {self.reserve} kept for known identities (--reserved-connections)" if self.reserve else ""
        self.log({
            "busy": f"503 refused {n} connection(s) (the latest from {client}): "
                    f"{limits.max_connections} connections open (--max-connections{kept})",
            "per_source": f"503 refused {n} connection(s) (the latest from {client}): {limits.max_per_source} "
                          f"unauthenticated connections open from that address (--max-per-source)",
            "handshake_evicted": f"dropped {n} unfinished TLS handshake(s) (the latest from {client}) to make "
                                 f"room for new connections (at most {limits.max_connections} handshakes, "
                                 f"{limits.max_per_source} per address)",
            "handshake_timeout": f"{n} TLS handshake(s) not completed within the handshake deadline "
                                 f"({min(limits.handshake_timeout_s, limits.header_timeout_s):g} s), the latest "
                                 f"from {client}: connection(s) closed",
        }[reason])

    def _refuse_connection(self, sock: socket.socket, client: str, reason: str, now: float) -> None:
        self._note_refusal(reason, client, now)
        lingering = sum(1 for c in self._conns.values() if c.slot is None)
        if self.ssl_context is not None or lingering >= MAX_LINGERING_REFUSALS:
            sock.close()  # under TLS a plain-text 503 means nothing: the client sees the connection close
            return
        conn = _Conn(sock, client, "drain", now + LINGER_S, None, now)
        self._conns[sock.fileno()] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._send_now(conn, self._busy_response(reason, client))
        self._linger(conn, now)

    def _busy_response(self, reason: str, client: str) -> Response:
        limits = self.limits
        error = (f"server busy: {limits.max_per_source} unauthenticated connections open from {client} "
                 f"(--max-per-source); retry" if reason == "per_source"
                 else f"server busy: {limits.max_connections} connections open"
                      + (f", {self.reserve} of them kept for known identities" if self.reserve else "") + "; retry")
        return Response(503, {"error": error}, "", {"Retry-After": "1"})

    def _on_ready(self, conn: _Conn) -> None:
        if conn.phase == "handshake":
            self._heard(conn)
            if not self._handshake(conn):
                return
        eof = self._read(conn)
        if conn.phase == "drain":
            if eof:
                self._close(conn)
            return
        if conn.phase == "head":
            self._on_head_bytes(conn, eof)
        if conn.phase == "body":
            self._on_body_bytes(conn, eof)

    def _handshake(self, conn: _Conn) -> bool:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
            return False
        except ssl.SSLWantWriteError:
            self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            return False
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
            self.log(f"TLS handshake refused from {conn.client}: {reason}")
            self._close(conn)
            return False
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        conn.peer, conn.peer_names = peer_identity(conn.sock), certificate_names(conn.sock)
        # Only now, authenticated or not, does the connection ask for a slot in the shared pool.
        self._leave_handshake_pool(conn)
        known = self.known_peer is not None and bool(self.known_peer(conn.peer, conn.peer_names))
        refusal = self._admit_to_pool(conn.client, known, handshaken=True)
        now = time.monotonic()
        if refusal:
            conn.slot = None
            self._note_refusal(refusal, conn.client, now)
            if sum(1 for c in self._conns.values() if c.slot is None) > MAX_LINGERING_REFUSALS:
                self._close(conn)
            else:  # the handshake is done: a 503 the client can read
                self._send_now(conn, self._busy_response(refusal, conn.client))
                self._linger(conn, now)
            return False
        conn.slot, conn.known = "pool", known
        conn.phase, conn.deadline = "head", conn.accepted + self.limits.header_timeout_s
        return True

    def _leave_handshake_pool(self, conn: _Conn) -> None:
        mine = self._handshaking.get(conn.client, [])
        if conn in mine:
            self._heard(conn)  # no longer counted as silent
            mine.remove(conn)
            if not mine:
                del self._handshaking[conn.client]

    def _read(self, conn: _Conn) -> bool:
        """Append what has arrived to conn.buf (dropped while lingering), no more than the
        phase needs: a head's limit, or the declared body (so an unauthenticated client never
        gets a body buffered). True at the end of the stream (or a broken one)."""
        room = (self.limits.max_head_bytes + 4 if conn.phase in ("head", "handshake")
                else (conn.request.content_length or 0) if conn.phase == "body" else 0)
        for _ in range(64):  # bounded: other connections get their turn
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            except (ssl.SSLError, OSError):  # a reset, or TLS ended without close_notify: over either way
                return True
            if not chunk:
                return True
            if conn.phase != "drain":
                conn.buf += chunk
                if len(conn.buf) >= room:
                    return False  # the rest waits in the kernel until this phase is over
        return False

    def _on_head_bytes(self, conn: _Conn, eof: bool) -> None:
        match = _HEAD_END.search(conn.buf, max(0, conn.scanned - 3))
        if match is None:
            conn.scanned = len(conn.buf)
            if len(conn.buf) > self.limits.max_head_bytes:
                self._refuse(conn, HTTPError(431, f"request head over {self.limits.max_head_bytes} bytes"))
            elif eof:
                self._close(conn)  # gone before sending a request: nothing to answer
            return
        if match.start() > self.limits.max_head_bytes:
            self._refuse(conn, HTTPError(431, f"request head over {self.limits.max_head_bytes} bytes"))
            return
        try:
            request = parse_head(bytes(conn.buf[:match.start()]))
        except HTTPError as exc:
            self._refuse(conn, exc)
            return
        request.client, request.peer, request.peer_names = conn.client, conn.peer, conn.peer_names
        conn.request = request
        del conn.buf[:match.end()]
        refusal = self.check_head(request)
        if refusal is None and request.method == "POST" and request.content_length is None:
            refusal = Response(411, {"error": "Content-Length required"}, "Content-Length required")
        if refusal is None and (request.content_length or 0) > self.limits.max_body_bytes:
            reason = f"payload of {request.content_length} bytes exceeds {self.limits.max_body_bytes}"
            refusal = Response(413, {"error": reason}, reason)
        if refusal is not None:
            self._send_now(conn, refusal)
            self._linger(conn, time.monotonic())
            return
        if request.header("expect").lower() == "100-continue" and request.content_length:
            self._send_bytes(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.phase, conn.deadline = "body", time.monotonic() + self.limits.body_timeout_s

    def _on_body_bytes(self, conn: _Conn, eof: bool) -> None:
        request = conn.request
        need = request.content_length or 0
        if len(conn.buf) >= need:
            request.body = bytes(conn.buf[:need])
            self._selector.unregister(conn.sock)
            del self._conns[conn.sock.fileno()]
            self._work.put((conn, request))
        elif eof:
            self._refuse(conn, HTTPError(400, f"body ended after {len(conn.buf)} of {need} bytes (Content-Length)"))

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if now > c.deadline]:
            if conn.phase == "handshake":
                self._note_refusal("handshake_timeout", conn.client, now)
                self._close(conn)
            elif conn.phase == "head":
                self._refuse(conn, HTTPError(408, f"request headers not received within "
                                                  f"{self.limits.header_timeout_s:g} s"), linger=False)
            elif conn.phase == "body":
                need = conn.request.content_length
                self._refuse(conn, HTTPError(408, f"body not received within {self.limits.body_timeout_s:g} s "
                                                  f"({len(conn.buf)} of {need} bytes)"), linger=False)
            else:
                self._close(conn)

    # --- answering -------------------------------------------------------------------------------
    def _refuse(self, conn: _Conn, exc: HTTPError, linger: bool = True) -> None:
        """Answer from the I/O thread (small, non-blocking), then linger or close."""
        self._send_now(conn, Response(exc.code, {"error": exc.reason}, exc.reason, exc.headers))
        if linger:
            self._linger(conn, time.monotonic())
        else:
            self._close(conn)

    def _send_now(self, conn: _Conn, response: Response) -> None:
        if response.note:
            who = conn.request.who if conn.request else conn.client + (f" ({conn.peer})" if conn.peer else "")
            self._log_response(conn.request, who, response)
        self._send_bytes(conn, response.encode())

    def _send_bytes(self, conn: _Conn, data: bytes) -> None:
        try:
            conn.sock.send(data)  # small; a client whose window is full has only itself to blame
        except (OSError, ssl.SSLError):
            pass

    def _linger(self, conn: _Conn, now: float) -> None:
        conn.phase, conn.deadline = "drain", now + LINGER_S
        conn.buf.clear()
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except (OSError, ssl.SSLError):
            self._close(conn)

    def _log_response(self, request: Request | None, who: str, response: Response) -> None:
        method, path = (request.method, request.path) if request else ("-", "-")
        # Never log a query string: credentials end up in them, whatever the API says.
        path, query, _ = path.partition("?")
        path += "?<query not logged>" if query else ""
        line = f"{response.code} {method} {path} from {who}: {response.note}"
        if self.on_response is not None:
            self.on_response(request, who, response, line)
        else:
            self.log(line)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        """Give back the slot a closed connection held (on the I/O thread or a worker)."""
        if conn.slot == "handshake":
            self._leave_handshake_pool(conn)  # only the I/O thread holds handshakes
        with self._open_lock:
            if conn.slot == "handshake":
                self._handshakes -= 1
            elif conn.slot == "pool":
                self._pool -= 1
                self._pool_unknown -= not conn.known
            if conn.slot is not None and not conn.known:
                left = self._unknown_by_source.get(conn.client, 0) - 1
                if left > 0:
                    self._unknown_by_source[conn.client] = left
                else:
                    self._unknown_by_source.pop(conn.client, None)
            conn.slot = None

    # --- the workers -----------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, request = item
            try:
                response = self.handle(request)
            except Exception as exc:  # never let a request kill a worker
                response = Response(500, {"error": "internal error"}, f"internal error: {type(exc).__name__}: {exc}")
            # Logged before it is sent, so a client that has its answer finds the line written.
            self._log_response(request, request.who, response)
            try:
                self._write(conn, response.encode())
            except (OSError, ssl.SSLError) as exc:
                self.log(f"{response.code} response to {request.who} not delivered: {type(exc).__name__}: {exc}")
            finally:
                try:
                    conn.sock.close()
                except OSError:
                    pass
                self._release(conn)

    def _write(self, conn: _Conn, data: bytes) -> None:
        # One deadline for the whole response, not per send: a client that reads a byte at a
        # time cannot keep a worker.
        deadline = time.monotonic() + self.limits.body_timeout_s
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("response not read within the body deadline")
            conn.sock.settimeout(left)
            sent = conn.sock.send(view[:65536])
            view = view[sent:]
