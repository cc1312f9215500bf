"""The receiver's own telemetry: /metrics (requests, alerts, runs, refusals) read back with
Prometheus' parser, and its logs as JSON lines."""

from __future__ import annotations

import http.client
import io
import json
import threading

from prometheus_client.parser import text_string_to_metric_families

from aidc import polling
from aidc.runbook.receiver import Receiver
from aidc.runbook.serve_metrics import JsonLines
from runbook_fakes import QUARANTINE_AND_NOTIFY, alert
from test_receiver import TOKEN, post, webhook


def scrape(rec) -> dict[tuple, float]:
    conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=5)
    conn.request("GET", "/metrics")  # no token: scraped like any exporter
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    text = resp.read().decode()
    conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_alerts_finished_runs_and_refusals(make_engine, fakes, serve_receiver):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    fakes.metrics.values['broken{Hostname="gpu-1"}'] = [1.0]
    rec = serve_receiver(engine, TOKEN)
    assert post(rec, webhook(alert("NodeBroken", "gpu-1")))[0] == 200
    assert post(rec, webhook(alert("NodeBroken", "gpu-1")))[0] == 200  # the same alert again
    assert post(rec, webhook(alert("NodeBroken", "gpu-1")), token="wrong")[0] == 401
    assert post(rec, b"{not json")[0] == 400
    polling.wait_for("the run to finish", lambda: engine.state.runs()[0].status == "done", 30, 0.05)
    polling.wait_for("the finished run to be counted",
                     lambda: scrape(rec).get(("aidc_receiver_runs_finished_total", (("status", "done"),))), 10, 0.05)

    m = scrape(rec)
    assert m[("aidc_receiver_requests_total", (("code", "200"), ("method", "POST"), ("route", "/alerts")))] == 2
    assert m[("aidc_receiver_requests_total", (("code", "401"), ("method", "POST"), ("route", "/alerts")))] == 1
    assert m[("aidc_receiver_alerts_total", (("outcome", "started"),))] == 1
    assert m[("aidc_receiver_alerts_total", (("outcome", "duplicate"),))] == 1
    assert m[("aidc_receiver_refusals_total", (("reason", "unauthenticated"),))] == 1
    assert m[("aidc_receiver_refusals_total", (("reason", "bad_request"),))] == 1
    assert m[("aidc_receiver_runs_finished_total", (("status", "done"),))] == 1
    assert ("aidc_receiver_open_connections", ()) in m


def test_invented_paths_do_not_grow_the_series(make_engine, serve_receiver):
    rec = serve_receiver(make_engine(QUARANTINE_AND_NOTIFY), TOKEN)
    for i in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=5)
        conn.request("GET", f"/made-up-{i}", headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 404
        conn.close()
    routes = {dict(labels)["route"] for (name, labels) in scrape(rec) if name == "aidc_receiver_requests_total"}
    assert "other" in routes and not any(r.startswith("/made-up") for r in routes)


def test_the_receiver_logs_json_lines_with_the_request_fields(make_engine):
    stream = io.StringIO()
    rec = Receiver(make_engine(QUARANTINE_AND_NOTIFY), TOKEN, "127.0.0.1", 0, scan_interval_s=0.1)
    rec.log = JsonLines("aidc.runbook.serve", stream)  # the default, pointed at a buffer
    thread = threading.Thread(target=rec.serve_forever, daemon=True)
    thread.start()
    try:
        assert post(rec, webhook(alert("NodeBroken", "gpu-1")), token="wrong")[0] == 401
        polling.wait_for("the 401 to be logged", lambda: '"status": 401' in stream.getvalue(), 10, 0.05)
    finally:
        rec.shutdown()
        thread.join(timeout=10)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    refused = next(r for r in records if r.get("status") == 401)
    assert refused["method"] == "POST" and refused["path"] == "/alerts" and refused["ts"].endswith("Z")
    assert TOKEN not in stream.getvalue() and "wrong" not in stream.getvalue()
