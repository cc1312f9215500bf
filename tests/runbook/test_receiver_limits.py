"""The receiver's limits: slow or hostile clients, strict HTTP framing, bounded payloads.

Each test talks to a real receiver on loopback through raw sockets, the way a broken or
hostile client would. Deadlines are made short (fractions of a second) so the tests stay fast;
the assertions are about what the client is told (408, 503, 400), never about how long it took,
except in the one slow-client acceptance test at the end.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import statistics
import threading
import time

import pytest

from aidc import polling
from aidc.runbook.receiver import Limits, Receiver
from aidc.spec import Policy
from runbook_fakes import QUARANTINE_AND_NOTIFY, alert

TOKEN = "s3cret-token"


@pytest.fixture
def start(make_engine, fakes, serve_receiver):
    """start(policy=None, tls=None, **limits) -> a serving Receiver with `.lines` (its log)."""

    def start_receiver(policy: Policy | None = None, tls=None, **limits) -> Receiver:
        engine = make_engine(QUARANTINE_AND_NOTIFY, policy=policy)
        fakes.metrics.values['broken{Hostname="gpu-1"}'] = [1.0]
        return serve_receiver(engine, TOKEN, tls=tls, limits=Limits(**limits))

    return start_receiver


def webhook(*alerts) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)}).encode()


def request(body: bytes, *headers: str, auth: str = f"Bearer {TOKEN}", length: bool = True) -> bytes:
    lines = ["POST /alerts HTTP/1.1", "Host: receiver", *headers]
    if auth:
        lines.append(f"Authorization: {auth}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes, read the whole reply (the receiver closes after each response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), (json.loads(body) if body else {})


def status_of_reply(sock: socket.socket) -> int | None:
    """The status code the server sent on this socket, or None when it closed without one."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/") else None


# --- HTTP strictness -------------------------------------------------------------------------

def test_two_content_length_headers_are_refused_even_when_equal(start):
    rec = start()
    body = webhook(alert("NodeBroken", "gpu-1"))
    for second in (len(body), 2):
        status, reply = exchange(rec.port, request(body, f"Content-Length: {second}"))
        assert status == 400 and "Content-Length" in reply["error"]
    assert rec.engine.state.runs() == []


def test_a_content_length_that_is_not_a_plain_number_is_refused(start):
    rec = start()
    for value in ("+5", "5, 5", "0x10", "-1", " "):
        status, _ = exchange(rec.port, request(b"{}", f"Content-Length: {value}", length=False))
        assert status == 400, value


def test_transfer_encoding_is_refused_explicitly(start):
    rec = start()
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    # With a Content-Length too, the two framings disagree: the classic request-smuggling shape.
    status, reply = exchange(rec.port, request(chunked, "Transfer-Encoding: chunked"))
    assert status == 400 and "Transfer-Encoding" in reply["error"]
    status, reply = exchange(rec.port, request(chunked, "Transfer-Encoding: chunked", length=False))
    assert status == 501 and "Content-Length" in reply["error"]
    assert rec.engine.state.runs() == []


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory):
    from certs import CA

    root = tmp_path_factory.mktemp("limits-pki")
    ca = CA.create(root, "limits-ca")
    return ca, ca.issue(root, "aidc-runbook", server=True)


@pytest.mark.parametrize("over_tls", [False, True], ids=["http", "https"])
def test_a_declared_body_that_never_arrives_is_408(start, server_cert, over_tls):
    from aidc.runbook import tls

    ca, server = server_cert
    rec = start(body_timeout_s=0.3, tls=tls.TLSConfig(server.cert, server.key) if over_tls else None)
    head = request(b"", length=False).removesuffix(b"\r\n\r\n") + b"\r\nContent-Length: 100\r\n\r\n"
    raw = socket.create_connection(("127.0.0.1", rec.port), timeout=10)
    with (ssl.create_default_context(cafile=str(ca.cert_file)).wrap_socket(raw, server_hostname="127.0.0.1")
          if over_tls else raw) as sock:
        sock.sendall(head)  # and then nothing, connection held open
        assert status_of_reply(sock) == 408
    polling.wait_for("the 408 log line", lambda: any(line.startswith("408 POST /alerts") for line in rec.lines), 5)
    assert rec.engine.state.runs() == []


def test_the_bearer_scheme_is_case_insensitive_and_a_401_says_what_is_accepted(start):
    rec = start()
    for n, scheme in enumerate(("Bearer", "bearer", "BEARER")):
        body = webhook(alert("Unrelated", "gpu-1", fingerprint=str(n)))
        assert exchange(rec.port, request(body, auth=f"{scheme} {TOKEN}"))[0] == 200
    status, reply = exchange(rec.port, request(webhook(), auth=f"Token {TOKEN}"))
    assert status == 401 and "Authorization: Bearer <token>" in reply["error"]


def test_two_authorization_headers_are_refused(start):
    rec = start()
    status, _ = exchange(rec.port, request(webhook(alert("NodeBroken", "gpu-1")), f"Authorization: Bearer {TOKEN}"))
    assert status == 400
    assert rec.engine.state.runs() == []


# --- payload bounds ------------------------------------------------------------------------------

@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_a_payload_are_refused(start, constant):
    rec = start()
    body = webhook(alert("NodeBroken", "gpu-1")).replace(b'"annotations": {}', f'"annotations": {{"v": {constant}}}'.encode())
    assert constant.encode() in body
    status, reply = exchange(rec.port, request(body))
    assert status == 400 and constant in reply["error"]
    assert rec.engine.state.runs() == []


def test_a_batch_over_the_alert_cap_is_413_and_nothing_is_processed(start):
    rec = start(max_alerts=5)
    alerts = [alert("NodeBroken", f"gpu-{i % 4}", fingerprint=str(i)) for i in range(6)]
    status, reply = exchange(rec.port, request(webhook(*alerts)))
    assert status == 413 and "max_alerts" in reply["error"]
    assert rec.engine.state.runs() == []
    assert exchange(rec.port, request(webhook(*alerts[:5])))[0] == 200


def test_a_duplicate_alert_in_dry_run_is_deduplicated_like_a_live_one(start):
    rec = start(policy=Policy(dry_run=True))
    body = webhook(alert("NodeBroken", "gpu-1", fingerprint="dup"))
    outcomes = [exchange(rec.port, request(body))[1]["results"][0]["outcome"] for _ in range(3)]
    assert outcomes == ["dry_run", "duplicate", "duplicate"]
    planned = rec.engine.audit.records(kind="runbook.dry_run.step")
    assert len(planned) == 4  # one plan: three steps and the on_failure step, audited once
    # A new firing of the same alert (new startsAt) is planned again, as a live one would start a run.
    again = webhook(alert("NodeBroken", "gpu-1", fingerprint="dup", starts_at="2026-01-02T00:00:00Z"))
    assert exchange(rec.port, request(again))[1]["results"][0]["outcome"] == "dry_run"


def test_alerts_seen_in_dry_run_still_start_a_run_once_dry_run_is_off(make_engine, fakes):
    from aidc.runbook.engine import Engine

    dry = make_engine(QUARANTINE_AND_NOTIFY, policy=Policy(dry_run=True))
    assert dry.submit_alert(alert("NodeBroken", "gpu-1")).outcome == "dry_run"
    live = Engine(catalog=dry.catalog, state=dry.state, audit=dry.audit, actuators=fakes, nodes=dry.nodes)
    assert live.submit_alert(alert("NodeBroken", "gpu-1")).outcome == "started"


# --- the connection model ---------------------------------------------------------------------------

def test_when_every_connection_slot_is_taken_a_new_client_gets_503_and_a_log_line(start):
    rec = start(max_connections=2, header_timeout_s=30)
    idle = [socket.create_connection(("127.0.0.1", rec.port), timeout=10) for _ in range(2)]
    try:
        polling.wait_for("both idle connections to be counted", lambda: rec.open_connections == 2, 5)
        status, reply = exchange(rec.port, request(webhook(alert("NodeBroken", "gpu-1"))))
        assert status == 503 and "connections" in reply["error"]
        polling.wait_for("the refusal's log line", lambda: any(line.startswith("503") for line in rec.lines), 5)
    finally:
        for sock in idle:
            sock.close()
    # The slots come back when those clients go.
    polling.wait_for("the slots to free", lambda: rec.open_connections == 0, 5)
    assert exchange(rec.port, request(webhook(alert("NodeBroken", "gpu-1"))))[0] == 200


def trickle(sock: socket.socket, data: bytes, interval_s: float, limit_s: float) -> bool:
    """Send `data` a byte at a time; False when the server hung up before it was all sent."""
    deadline = time.monotonic() + limit_s
    for byte in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"the server still reads a trickle after {limit_s} s")
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return False
        time.sleep(interval_s)
        sock.setblocking(False)
        try:
            if sock.recv(4096, socket.MSG_PEEK) is not None:
                return False  # the server answered (or closed) mid-trickle
        except BlockingIOError:
            pass
        except (ConnectionResetError, OSError):
            return False
        finally:
            sock.setblocking(True)
    return True


def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_header_deadline(start):
    """Every byte arrives well within any per-read timeout; the deadline is for the whole head."""
    rec = start(header_timeout_s=0.5)
    head = request(webhook(alert("NodeBroken", "gpu-1")))
    with socket.create_connection(("127.0.0.1", rec.port), timeout=10) as sock:
        assert not trickle(sock, head, interval_s=0.05, limit_s=8), "the whole request went through"
        assert status_of_reply(sock) == 408
    assert rec.engine.state.runs() == []
    polling.wait_for("the 408 log line", lambda: any(line.startswith("408") for line in rec.lines), 5)


def test_a_body_trickled_a_byte_at_a_time_is_cut_off_at_the_body_deadline(start):
    rec = start(body_timeout_s=0.5)
    body = webhook(alert("NodeBroken", "gpu-1"))
    data = request(body)
    head_len = data.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", rec.port), timeout=10) as sock:
        sock.sendall(data[:head_len])
        assert not trickle(sock, data[head_len:], interval_s=0.05, limit_s=8), "the whole body went through"
        assert status_of_reply(sock) == 408
    assert rec.engine.state.runs() == []


def test_a_tls_handshake_trickled_a_byte_at_a_time_is_cut_off_at_the_header_deadline(start, server_cert):
    from aidc.runbook import tls

    _, server = server_cert
    rec = start(tls=tls.TLSConfig(server.cert, server.key), header_timeout_s=0.5)
    # A real ClientHello, produced in memory, then sent one byte at a time.
    client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                                   server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", rec.port), timeout=10) as sock:
        assert not trickle(sock, hello, interval_s=0.05, limit_s=15), "the whole ClientHello went through"
    polling.wait_for("the handshake's log line",
                     lambda: any("TLS handshake" in line and "deadline" in line for line in rec.lines), 5)


# --- the acceptance test: real alerts under a crowd of trickling clients ---------------------------

TRICKLERS, REAL_ALERTS, ANSWER_WITHIN_S = 200, 50, 2.0
# The tricklers come from 8 loopback addresses, 25 each: under --max-per-source, so that they
# all hold their connections (one address would be capped at 64, the test's point lost).
TRICKLER_SOURCES = [f"127.0.0.{2 + i}" for i in range(8)]


class Tricklers:
    """N sockets each sending a request head one byte every `interval_s`, reconnecting when cut off."""

    def __init__(self, port: int, count: int, interval_s: float):
        self.port, self.count, self.interval_s = port, count, interval_s
        self.head = request(webhook(alert("NodeBroken", "gpu-1")))
        self.stop = threading.Event()
        self.cut_off = 0
        self.socks: list[tuple[socket.socket, int]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self, i: int) -> tuple[socket.socket, int]:
        source = TRICKLER_SOURCES[i % len(TRICKLER_SOURCES)]
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))
        sock.setblocking(False)
        return sock, 0

    def open(self) -> "Tricklers":
        self.socks = [self._connect(i) for i in range(self.count)]
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            for i, (sock, sent) in enumerate(self.socks):
                try:
                    sock.send(self.head[sent % len(self.head):][:1])
                    self.socks[i] = (sock, sent + 1)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:  # cut off by the server: come back, as an attacker would
                    sock.close()
                    self.cut_off += 1
                    self.socks[i] = self._connect(i)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sock, _ in self.socks:
            sock.close()


def test_real_alerts_are_answered_within_2_s_while_200_clients_trickle_headers(start):
    rec = start()  # the default limits, as `aidc runbook serve` runs
    tricklers = Tricklers(rec.port, TRICKLERS, interval_s=0.5).open()
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def post_one(i: int) -> None:
        body = webhook(alert("NodeBroken", f"gpu-{i % 4}", fingerprint=f"real-{i}"))
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=10)
        try:
            conn.request("POST", "/alerts", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
            status = conn.getresponse().status
        except OSError:
            status = 0
        finally:
            conn.close()
        with lock:
            latencies.append(time.monotonic() - t0)
            statuses.append(status)

    try:
        polling.wait_for("the trickling clients to be connected",
                         lambda: rec.open_connections >= TRICKLERS, 10)
        time.sleep(1.0)  # let them trickle a while first
        posters = [threading.Thread(target=post_one, args=(i,)) for i in range(REAL_ALERTS)]
        for t in posters:
            t.start()
        for t in posters:
            t.join(timeout=30)
        still_trickling = rec.open_connections
    finally:
        tricklers.close()
    latencies.sort()
    print(f"\n{REAL_ALERTS} real alerts under {TRICKLERS} trickling clients: "
          f"p50 {statistics.median(latencies) * 1000:.0f} ms, p90 {latencies[int(0.9 * len(latencies))] * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms; statuses {sorted(set(statuses))}; "
          f"open connections at the end {still_trickling}; tricklers cut off {tricklers.cut_off}")
    assert statuses == [200] * REAL_ALERTS
    assert len(latencies) == REAL_ALERTS and latencies[-1] < ANSWER_WITHIN_S
    assert still_trickling >= TRICKLERS // 2, "the tricklers were not actually holding connections"


# --- what is already stored, and what an operator is told ---------------------------------------------

def test_a_nan_stored_by_an_older_receiver_does_not_break_the_json_listings(tmp_path, aidc_cli):
    """Before NaN was refused at the door it reached the run state and the audit log; one such
    row must not make `runbook runs --json` or `audit show --json` fail for the whole database."""
    from aidc.audit.log import AuditLog
    from aidc.runbook.state import RunState

    state = RunState(tmp_path / "state.db")
    with state.transaction() as db:
        state.create_run(db, "take-out", "gpu-1", {"labels": {}, "annotations": {"v": float("nan")}},
                         [("out", "quarantine")])
    state.close()
    with AuditLog(tmp_path / "audit.db") as audit:
        audit.append("runbook.run.started", "take-out on gpu-1", actor="test", node="gpu-1",
                     payload={"trigger": {"annotations": {"v": float("inf")}}})
    runs = aidc_cli("runbook", "runs", "--json", "--state-db", str(tmp_path / "state.db"))
    assert runs.returncode == 0, runs.stderr
    assert json.loads(runs.stdout)[0]["trigger"]["annotations"]["v"] == "NaN"
    shown = aidc_cli("audit", "show", "--json", "--db", str(tmp_path / "audit.db"))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["payload"]["trigger"]["annotations"]["v"] == "Infinity"


def test_serve_help_names_every_limit_and_the_accepted_authorization(aidc_cli):
    out = aidc_cli("runbook", "serve", "--help", check=True, env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    for flag in ("--max-connections", "--header-timeout", "--body-timeout", "--max-alerts", "--request-workers",
                 "--max-per-source", "--reserved-connections", "--handshake-timeout"):
        assert flag in out
    assert "Authorization: Bearer <token>" in out and "any case" in out


def test_serve_refuses_limits_that_make_no_sense_with_one_error_line(aidc_cli, tmp_path):
    out = aidc_cli("runbook", "serve", "--max-connections", "0", "--token-file", str(tmp_path / "none"))
    assert out.returncode != 0 and "--max-connections" in out.stderr and "Traceback" not in out.stderr
    for args, flag in ((["--max-per-source", "0"], "--max-per-source"),
                       (["--max-connections", "8", "--reserved-connections", "8"], "--reserved-connections"),
                       (["--handshake-timeout", "0"], "--handshake-timeout")):
        out = aidc_cli("runbook", "serve", *args, "--token-file", str(tmp_path / "none"))
        assert out.returncode != 0 and "Invalid value" in out.stderr and flag in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body(start):
    """curl sends `Expect: 100-continue` for bodies over 1 KiB and waits for the go-ahead."""
    rec = start()
    body = webhook(alert("NodeBroken", "gpu-1"))
    data = request(body, "Expect: 100-continue")
    head_len = data.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", rec.port), timeout=10) as sock:
        sock.sendall(data[:head_len])
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(data[head_len:])
        assert status_of_reply(sock) == 200
