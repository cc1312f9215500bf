"""The webhook receiver: authentication, bad input and repeats, over real HTTP on loopback."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from aidc import polling
from aidc.runbook.receiver import MAX_BODY_BYTES, Limits, Receiver
from runbook_fakes import QUARANTINE_AND_NOTIFY, alert

TOKEN = "s3cret-token"


@pytest.fixture
def receiver(make_engine, fakes, serve_receiver):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values['broken{Hostname="gpu-1"}'] = [1.0]
    return serve_receiver(engine, TOKEN)


def post(rec, body: bytes, token: str | None = TOKEN, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=10)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/alerts", body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data else None)


def webhook(*alerts) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "receiver": "aidc", "groupKey": "{}:{}",
                       "truncatedAlerts": 0, "alerts": list(alerts)}).encode()



def healthy(rec) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=5)
    conn.request("GET", "/healthz")
    ok = conn.getresponse().status == 200
    conn.close()
    return ok


def test_requests_without_the_bearer_token_are_refused_with_401(receiver, fakes):
    assert post(receiver, webhook(alert("NodeBroken", "gpu-1")), token=None)[0] == 401
    assert post(receiver, webhook(alert("NodeBroken", "gpu-1")), token="wrong")[0] == 401
    assert post(receiver, webhook(alert("NodeBroken", "gpu-1")), token=None,
                headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert receiver.engine.state.runs() == [] and fakes.scheduler.calls == []
    assert any(line.startswith("401 POST /alerts") for line in receiver.lines)


def test_malformed_json_gets_400_and_a_log_line_and_the_server_lives_on(receiver):
    for body in (b"{not json", b"\xff\xfe", b"[]", b'{"alerts": "x"}', b'{"alerts": [{"labels": {"a": 1}}]}'):
        status, reply = post(receiver, body)
        assert status == 400 and reply["error"]
    # The server logs after it has answered: allow it a moment to write the last line.
    polling.wait_for("five '400 POST' log lines",
             lambda: sum(line.startswith("400 POST") for line in receiver.lines) == 5, 5.0)
    assert healthy(receiver)


def test_an_oversized_payload_gets_413_without_being_processed(receiver):
    status, _ = post(receiver, b" " * (MAX_BODY_BYTES + 1))
    assert status == 413
    assert receiver.engine.state.runs() == []
    assert healthy(receiver)


def test_a_body_without_content_length_is_refused(receiver):
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
    conn.putrequest("POST", "/alerts")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()


def test_duplicate_notifications_execute_the_runbook_once(receiver, fakes):
    body = webhook(alert("NodeBroken", "gpu-1", fingerprint="abc"))
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(post(receiver, body))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in replies] == [200] * 6
    outcomes = sorted(r["results"][0]["outcome"] for _, r in replies)
    assert outcomes == ["duplicate"] * 5 + ["started"]
    run_id = next(r["results"][0]["run_id"] for _, r in replies if r["results"][0]["outcome"] == "started")
    polling.wait_for("the run to finish", lambda: receiver.engine.state.get_run(run_id).status == "done", 15.0)
    for _ in range(3):  # Alertmanager's later repeats
        assert post(receiver, body)[1]["results"][0]["outcome"] == "duplicate"
    assert fakes.scheduler.calls == [("quarantine", "gpu-1")]
    assert len(receiver.engine.state.runs()) == 1


def test_a_webhook_with_several_alerts_reports_each(receiver):
    status, reply = post(receiver, webhook(alert("NodeBroken", "gpu-1", fingerprint="1"),
                                           alert("Unknown", "gpu-1", fingerprint="2"),
                                           {**alert("NodeBroken", "gpu-2", fingerprint="3"), "status": "resolved"}))
    assert status == 200
    assert [r["outcome"] for r in reply["results"]] == ["started", "unmatched", "resolved"]


def test_the_runs_listing_needs_the_token_too(receiver):
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    conn.request("GET", "/runs")
    assert conn.getresponse().status == 401
    conn.close()


def test_a_receiver_refuses_to_start_without_a_token(make_engine):
    with pytest.raises(ValueError, match="token"):
        Receiver(make_engine(QUARANTINE_AND_NOTIFY), "", "127.0.0.1", 0)


def test_deeply_nested_json_gets_400_not_a_500(receiver):
    status, reply = post(receiver, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in reply["error"]
    assert healthy(receiver)


def raw_exchange(port: int, request: bytes, close_after_send: bool) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        if close_after_send:
            sock.shutdown(socket.SHUT_WR)
        return sock.recv(4096)


def test_a_body_shorter_than_its_content_length_gets_a_4xx(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    lines: list[str] = []
    rec = Receiver(engine, TOKEN, "127.0.0.1", 0, scan_interval_s=0.1, log=lines.append, limits=Limits(body_timeout_s=0.5))
    thread = threading.Thread(target=rec.serve_forever, daemon=True)
    thread.start()
    try:
        head = f"POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n"
        request = head.encode() + b'{"alerts":'
        # A client that stalls mid-body: 408 once the request timeout passes.
        assert raw_exchange(rec.port, request, close_after_send=False).startswith(b"HTTP/1.1 408")
        # A client that closes mid-body: 400.
        assert raw_exchange(rec.port, request, close_after_send=True).startswith(b"HTTP/1.1 400")
        assert engine.state.runs() == [] and healthy(rec)
        polling.wait_for("the two log lines", lambda: any(line.startswith("408 POST") for line in lines)
                         and any(line.startswith("400 POST") for line in lines), 5.0)
    finally:
        rec.shutdown()
        thread.join(timeout=10)
