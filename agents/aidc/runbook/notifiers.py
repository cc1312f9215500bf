"""Where a runbook's `notify` step reaches on-call: a log line always, plus the spec's targets.

Targets are plugins registered by kind (`NOTIFIER_KINDS`), each a payload format and an HTTP
POST: Slack's incoming webhooks (`{"text": ...}` with Block Kit blocks) and PagerDuty's Events
API v2 (`event_action: trigger` with a `dedup_key`, so a notification sent again after a
restart of the receiver updates the same incident instead of paging twice). Secrets (the Slack
webhook URL, the PagerDuty routing key) never live in the stack file: they come from an
environment variable or a 0600 file, as the PKCS#11 PIN does.

Delivery is bounded: a few attempts with backoff on connection errors, 429 and 5xx, each with a
timeout; a 4xx is the payload's or the key's fault and is not retried. Any target that fails
makes the step fail, naming it, after every target was tried (one dead chat does not silence
the pager).
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from aidc import __version__
from aidc.errors import AidcError
from aidc.runbook.actuators import LogNotifier

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
# PagerDuty's severities are critical, error, warning, info; a runbook's are info, warning, critical.
PAGERDUTY_SEVERITY = {"info": "info", "warning": "warning", "critical": "critical"}
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
SUMMARY_MAX = 1024  # PagerDuty truncates payload.summary at 1024 characters


class NotifyError(AidcError):
    """A notification target could not be reached or refused the notification."""


def read_secret(env: str | None, file: str | None, what: str) -> str:
    """$env when set, else the first line of `file` (which must not be group- or world-readable)."""
    if env and os.environ.get(env, "").strip():
        return os.environ[env].strip()
    if file:
        path = Path(file)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise NotifyError(f"{what}: {path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
            value = path.read_text().strip().splitlines()
        except OSError as exc:
            raise NotifyError(f"{what}: cannot read {path}: {exc.strerror}") from None
        if value and value[0].strip():
            return value[0].strip()
        raise NotifyError(f"{what}: {path} is empty")
    where = " or ".join(w for w in (f"${env}" if env else "", f"file {file}" if file else "") if w)
    raise NotifyError(f"{what}: no secret: set {where or 'secret_env or secret_file in the stack'}")


def _summary(severity: str, message: str, context: dict) -> str:
    where = f"{context.get('runbook', 'aidc')} on {context.get('node', '-')}"
    return f"[{severity}] {where}: {message}"[:SUMMARY_MAX]


def slack_payload(severity: str, message: str, context: dict) -> dict:
    """An incoming-webhook message: `text` (the fallback shown in notifications) and blocks."""
    text = _summary(severity, message, context)
    fields = [f"*{k}*: {context[k]}" for k in ("runbook", "node", "run_id") if context.get(k) is not None]
    return {"text": text,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}},
                       {"type": "context", "elements": [{"type": "mrkdwn", "text": " | ".join(fields) or "aidc"}]}]}


def pagerduty_event(routing_key: str, severity: str, message: str, context: dict, source: str) -> dict:
    """An Events API v2 trigger. The dedup key is the run's: a resend updates, never re-pages."""
    dedup = ":".join(str(context.get(k, "-")) for k in ("runbook", "node", "run_id"))
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": f"aidc:{dedup}"[:255],
        "payload": {
            "summary": _summary(severity, message, context),
            "source": source,
            "severity": PAGERDUTY_SEVERITY[severity],
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "component": str(context.get("node", "-")),
            "group": "aidc-runbook",
            "class": str(context.get("runbook", "notify")),
            "custom_details": {k: v for k, v in context.items() if v is not None},
        },
        "client": f"aidc {__version__}",
    }


def _worth_another_try(exc: BaseException) -> bool:
    # A 4xx other than 429 means the payload or the key is wrong: sending it again changes nothing.
    return not isinstance(exc, urllib.error.HTTPError) or exc.code == 429 or exc.code >= 500


def post_json(url: str, body: dict, what: str, timeout_s: float = 5.0, attempts: int = 3,
              backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> int:
    """POST `body`; the HTTP status of the accepting answer, or NotifyError naming why not."""
    from aidc.retry import RetryPolicy

    data = json.dumps(body, sort_keys=True, default=str).encode()

    def once() -> int:
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": f"aidc/{__version__}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status

    policy = RetryPolicy(attempts=attempts, base_s=backoff_s, cap_s=60.0, retry_on=(urllib.error.URLError, OSError))
    try:
        return policy.call(once, retryable=_worth_another_try, sleep=sleep)
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace").strip()
        last = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
        tries = exc.attempts
    except (urllib.error.URLError, OSError) as exc:
        last, tries = str(getattr(exc, "reason", None) or exc), exc.attempts
    raise NotifyError(f"{what}: not delivered after {tries} attempt(s): {last}")


class SlackNotifier:
    kind = "slack"

    def __init__(self, target, source: str, post=post_json):
        self.min_severity, self.post = target.min_severity, post
        self.webhook_url = read_secret(target.secret_env, target.secret_file, "slack webhook URL")

    def notify(self, severity: str, message: str, context: dict) -> None:
        self.post(self.webhook_url, slack_payload(severity, message, context), "slack")


class PagerDutyNotifier:
    kind = "pagerduty"

    def __init__(self, target, source: str, post=post_json):
        self.min_severity, self.post, self.source = target.min_severity, post, source
        self.url = target.url or PAGERDUTY_EVENTS_URL
        self.routing_key = read_secret(target.secret_env, target.secret_file, "pagerduty routing key")

    def notify(self, severity: str, message: str, context: dict) -> None:
        self.post(self.url, pagerduty_event(self.routing_key, severity, message, context, self.source), "pagerduty")


NOTIFIER_KINDS = {"slack": SlackNotifier, "pagerduty": PagerDutyNotifier}


class FanoutNotifier:
    """The log line first (always), then every target whose min_severity the notification meets."""

    def __init__(self, log: LogNotifier, targets: list):
        self.log, self.targets = log, targets

    def notify(self, severity: str, message: str, context: dict) -> None:
        self.log.notify(severity, message, context)
        failed = []
        for target in self.targets:
            if SEVERITY_RANK[severity] < SEVERITY_RANK[target.min_severity]:
                continue
            try:
                target.notify(severity, message, context)
            except NotifyError as exc:
                failed.append(str(exc))
        if failed:
            raise NotifyError("; ".join(failed))


def notifier_from_spec(spec, notify_file: Path | None) -> FanoutNotifier:
    """The spec's `notify:` targets behind the log notifier. A target without its secret is
    an error at start, not at the first page."""
    source = f"aidc/{spec.name}"
    return FanoutNotifier(LogNotifier(notify_file), [NOTIFIER_KINDS[t.kind](t, source) for t in spec.notify])
