"""Slack and PagerDuty notifications, sent by real HTTP to a local capture server and read
back as those services would read them."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aidc.runbook.actuators import Actuators, LogNotifier
from aidc.runbook.notifiers import (FanoutNotifier, NotifyError, PagerDutyNotifier, SlackNotifier, notifier_from_spec,
                                    post_json)
from aidc.spec import NotifyTarget, parse_spec
from runbook_fakes import QUARANTINE_AND_NOTIFY, alert

BROKEN_Q = 'broken{Hostname="gpu-1"}'


class Capture:
    """An HTTP endpoint that records each POST and answers with the next scripted status."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        self.statuses: list[int] = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                capture.received.append((self.path, json.loads(body)))
                code = capture.statuses.pop(0) if capture.statuses else 202
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status":"success"}' if code < 300 else b'{"status":"invalid event"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def bodies(self, path: str) -> list[dict]:
        return [body for p, body in self.received if p == path]


@pytest.fixture
def capture():
    c = Capture()
    yield c
    c.server.shutdown()


@pytest.fixture
def secrets(capture, monkeypatch):
    monkeypatch.setenv("TEST_SLACK_WEBHOOK", capture.url("/slack/T0/B0/secret"))
    monkeypatch.setenv("TEST_PD_KEY", "R0UT1NGK3Y")


def _spec(*targets: dict):
    return parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM",
                                                     "gpus_per_node": 2, "spares": 1}],
                       "notify": list(targets)})


def test_a_runbook_notification_reaches_slack_and_pagerduty_in_their_formats(make_engine, fakes, capture, secrets,
                                                                             tmp_path):
    spec = _spec({"kind": "slack", "secret_env": "TEST_SLACK_WEBHOOK"},
                 {"kind": "pagerduty", "secret_env": "TEST_PD_KEY", "url": capture.url("/v2/enqueue")})
    notifier = notifier_from_spec(spec, tmp_path / "notify.jsonl")
    engine = make_engine(QUARANTINE_AND_NOTIFY, actuators=Actuators(
        scheduler=fakes.scheduler, metrics=fakes.metrics, playbooks=fakes.playbooks, burnin=fakes.burnin,
        notifier=notifier))
    fakes.metrics.values[BROKEN_Q] = [1.0]
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1", gpu="0")).run_id)
    assert run.status == "done"

    [slack] = capture.bodies("/slack/T0/B0/secret")
    assert slack["text"] == "[warning] take-out on gpu-1: gpu-1 is out"
    assert slack["blocks"][0] == {"type": "section", "text": {"type": "mrkdwn", "text": slack["text"]}}

    [event] = capture.bodies("/v2/enqueue")
    assert event["routing_key"] == "R0UT1NGK3Y" and event["event_action"] == "trigger"
    assert event["dedup_key"] == f"aidc:take-out:gpu-1:{run.id}"
    payload = event["payload"]
    # The fields PagerDuty's Events API v2 requires, with values it accepts.
    assert payload["summary"] == "[warning] take-out on gpu-1: gpu-1 is out"
    assert payload["source"] == "aidc/t" and payload["severity"] in ("critical", "error", "warning", "info")
    assert payload["component"] == "gpu-1" and payload["custom_details"]["run_id"] == run.id
    # And the local log line, always.
    logged = [json.loads(line) for line in (tmp_path / "notify.jsonl").read_text().splitlines()]
    assert [entry["message"] for entry in logged] == ["gpu-1 is out"]


def test_a_resent_notification_of_the_same_run_keeps_its_pagerduty_dedup_key(capture, secrets):
    target = NotifyTarget(kind="pagerduty", secret_env="TEST_PD_KEY", url=capture.url("/v2/enqueue"))
    pd = PagerDutyNotifier(target, "aidc/t")
    context = {"runbook": "fatal-xid", "node": "gpu-3", "run_id": 7}
    pd.notify("critical", "GPU lost", context)
    pd.notify("critical", "GPU lost", context)  # e.g. the step ran again after a receiver restart
    keys = {event["dedup_key"] for event in capture.bodies("/v2/enqueue")}
    assert keys == {"aidc:fatal-xid:gpu-3:7"}


def test_targets_below_their_minimum_severity_are_not_sent(capture, secrets, tmp_path):
    pager = PagerDutyNotifier(NotifyTarget(kind="pagerduty", secret_env="TEST_PD_KEY", url=capture.url("/pd"),
                                           min_severity="critical"), "aidc/t")
    fanout = FanoutNotifier(LogNotifier(tmp_path / "n.jsonl"), [pager])
    fanout.notify("warning", "slow node", {"node": "gpu-1"})
    assert capture.bodies("/pd") == []
    fanout.notify("critical", "GPU lost", {"node": "gpu-1"})
    assert [e["payload"]["severity"] for e in capture.bodies("/pd")] == ["critical"]


def test_a_busy_service_is_retried_and_a_refused_payload_is_not(capture):
    naps: list[float] = []
    capture.statuses = [503, 429, 202]
    assert post_json(capture.url("/x"), {"a": 1}, "slack", sleep=naps.append) == 202
    assert len(capture.bodies("/x")) == 3 and naps == [0.5, 1.0]

    capture.statuses = [400]
    with pytest.raises(NotifyError, match=r"pagerduty: not delivered after 1 attempt\(s\): HTTP 400"):
        post_json(capture.url("/y"), {"a": 1}, "pagerduty", sleep=naps.append)
    assert len(capture.bodies("/y")) == 1


def test_an_unreachable_target_fails_the_notify_step_and_names_it(make_engine, fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_SLACK_WEBHOOK", "http://127.0.0.1:9/closed")  # discard port: nothing listens
    slack = SlackNotifier(NotifyTarget(kind="slack", secret_env="TEST_SLACK_WEBHOOK"), "aidc/t",
                          post=lambda url, body, what: post_json(url, body, what, timeout_s=1, sleep=lambda s: None))
    engine = make_engine(QUARANTINE_AND_NOTIFY, actuators=Actuators(
        scheduler=fakes.scheduler, metrics=fakes.metrics, playbooks=fakes.playbooks, burnin=fakes.burnin,
        notifier=FanoutNotifier(LogNotifier(None), [slack])))
    fakes.metrics.values[BROKEN_Q] = [1.0]
    run = engine.execute(engine.submit_alert(alert("NodeBroken", "gpu-1", gpu="0")).run_id)
    tell = next(s for s in engine.state.steps(run.id) if s.step_id == "tell")
    assert tell.status == "failed" and tell.result["error"].startswith("slack: not delivered after 3 attempt(s)")


def test_secrets_come_from_the_environment_or_a_private_file_never_the_stack(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs secret_env or secret_file"):
        NotifyTarget(kind="pagerduty")
    with pytest.raises(ValueError, match="URL is its secret"):
        NotifyTarget(kind="slack", secret_env="X", url="https://hooks.slack.com/services/T/B/S")

    key = tmp_path / "pd.key"
    key.write_text("FILEKEY\n")
    os.chmod(key, 0o644)
    target = NotifyTarget(kind="pagerduty", secret_file=str(key))
    with pytest.raises(NotifyError, match="readable by others"):
        PagerDutyNotifier(target, "aidc/t")
    os.chmod(key, 0o600)
    assert PagerDutyNotifier(target, "aidc/t").routing_key == "FILEKEY"

    monkeypatch.delenv("AIDC_NO_SUCH_VAR", raising=False)
    with pytest.raises(NotifyError, match=r"no secret: set \$AIDC_NO_SUCH_VAR"):
        PagerDutyNotifier(NotifyTarget(kind="pagerduty", secret_env="AIDC_NO_SUCH_VAR"), "aidc/t")
