"""A small HTTP/1.1 server for the webhook receiver, built for slow and hostile clients.

One I/O thread multiplexes every connection (`selectors`): it runs the TLS handshake, reads
the request head and body, and holds each request to two total deadlines, however slowly the
bytes trickle in: accept to end of headers (the TLS handshake included), and end of headers
to end of body. Only a complete request reaches one of a few worker threads, so a slow client
costs a file descriptor and a small buffer, never a thread. The number of open connections is
capped; over the cap a client is answered 503 at once and the refusal is logged (at most one
line a second, with a count). Framing is strict: one Content-Length, no Transfer-Encoding.
Each connection carries one request and is closed after its response (`Connection: close`).
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
    max_connections: int = 512       # open connections, in any phase; more are answered 503
    header_timeout_s: float = 10.0   # accept to end of headers, TLS handshake included
    body_timeout_s: float = 10.0     # end of headers to end of body; also bounds writing the response
    max_head_bytes: int = 16 << 10   # request line and headers; more is 431
    max_body_bytes: int = 1 << 20    # Alertmanager caps a notification's alerts; 1 MiB is far beyond a real one
    request_workers: int = 4         # threads that handle complete requests

    def __post_init__(self):
        for name in ("max_connections", "max_head_bytes", "max_body_bytes", "request_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 86400:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


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


class _Conn:
    """One client connection as the I/O thread sees it."""

    __slots__ = ("sock", "client", "phase", "deadline", "buf", "request", "counted", "peer", "peer_names",
                 "scanned")

    def __init__(self, sock, client: str, phase: str, deadline: float, counted: bool):
        self.sock, self.client, self.phase, self.deadline, self.counted = sock, client, phase, deadline, counted
        self.buf = bytearray()
        self.request: Request | None = None
        self.peer: str | None = None
        self.peer_names: frozenset = frozenset()
        self.scanned = 0  # bytes of buf already searched for the end of the head


class BoundedHTTPServer:
    """Serve `handle(request) -> Response` under `limits`.

    `check_head(request) -> Response | None` runs on the I/O thread as soon as the head is
    in, before any body is read: a refusal there (authentication, routing) costs no body."""

    def __init__(self, address: tuple[str, int], limits: ServerLimits, ssl_context: ssl.SSLContext | None,
                 check_head: Callable[[Request], Response | None], handle: Callable[[Request], Response],
                 log: Callable[[str], None],
                 on_response: Callable[[Request | None, str, Response, str], None] | None = None):
        # on_response(request, who, response, line): told of every answer instead of `log` (its
        # owner counts and logs it, structured); `line` is what `log` would have been given.
        self.limits, self.ssl_context, self.check_head, self.handle, self.log = (
            limits, ssl_context, check_head, handle, log)
        self.on_response = on_response
        self.refused_connections_total = 0  # answered 503 at the connection cap, ever
        self.listener = socket.create_server(address, backlog=min(limits.max_connections, 1024))
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}  # fd -> connection, owned by the I/O thread
        self._open = 0  # counted connections: the I/O thread's plus those with a worker
        self._open_lock = threading.Lock()
        self._work: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._refused = 0  # refusals not yet logged
        self._refusal_logged_at = 0.0

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return self._open

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
            now = time.monotonic()
            with self._open_lock:
                full = self._open >= self.limits.max_connections
                if not full:
                    self._open += 1
            if full:
                self._refuse_full(sock, address[0], now)
                continue
            phase = "head"
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError) as exc:
                    self.log(f"TLS setup failed for {address[0]}: {exc}")
                    sock.close()
                    self._uncount()
                    continue
                phase = "handshake"
            conn = _Conn(sock, address[0], phase, now + self.limits.header_timeout_s, counted=True)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _refuse_full(self, sock: socket.socket, client: str, now: float) -> None:
        self._refused += 1
        self.refused_connections_total += 1
        if now - self._refusal_logged_at >= 1.0:
            self.log(f"503 refused {self._refused} connection(s) (the latest from {client}): "
                     f"{self.limits.max_connections} connections open (--max-connections)")
            self._refused, self._refusal_logged_at = 0, now
        lingering = sum(1 for c in self._conns.values() if not c.counted)
        if self.ssl_context is not None or lingering >= MAX_LINGERING_REFUSALS:
            sock.close()  # under TLS a plain-text 503 means nothing: the client sees the connection close
            return
        conn = _Conn(sock, client, "drain", now + LINGER_S, counted=False)
        response = Response(503, {"error": f"server busy: {self.limits.max_connections} connections open; retry"},
                            "", {"Retry-After": "1"})
        self._conns[sock.fileno()] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._send_now(conn, response)
        self._linger(conn, now)

    def _on_ready(self, conn: _Conn) -> None:
        if conn.phase == "handshake" and not self._handshake(conn):
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
        conn.phase, conn.peer, conn.peer_names = "head", peer_identity(conn.sock), certificate_names(conn.sock)
        return True

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
                self.log(f"TLS handshake from {conn.client} not completed within the header deadline "
                         f"({self.limits.header_timeout_s:g} s): connection closed")
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
        if conn.counted:
            self._uncount()

    def _uncount(self) -> None:
        with self._open_lock:
            self._open -= 1

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
                self._uncount()

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
