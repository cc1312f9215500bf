"""The daemons' log lines: one JSON schema for every daemon (`--log-format json`), or text.

A JSON line holds `ts` (UTC, ISO 8601, milliseconds), `level`, `logger` (which daemon or module),
`msg`, then the event's own fields. `aidc runbook serve` defined it first; the agent and the
failover controller write the same, so a log shipper needs one parser for all three.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone

__all__ = ["JsonLines", "DaemonLog", "record_of"]

_FIELDS_OF_EVERY_RECORD = frozenset(vars(logging.makeLogRecord({})))


def record_of(logger: str, msg: str, level: str = "info", ts: float | None = None, **fields) -> dict:
    """One log event in the shared schema (fields that are None are left out)."""
    when = datetime.fromtimestamp(time.time() if ts is None else ts, tz=timezone.utc)
    return {"ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": level,
            "logger": logger, "msg": msg, **{k: v for k, v in fields.items() if v is not None}}


class JsonLines:
    """A log callable writing one JSON object per line (record_of). Never raises on a value JSON
    cannot hold (it is written as text)."""

    def __init__(self, logger: str, stream=None):
        self.logger, self.stream = logger, stream

    def __call__(self, msg: str, level: str = "info", **fields) -> None:
        stream = self.stream or sys.stderr
        stream.write(json.dumps(record_of(self.logger, msg, level, **fields), default=str) + "\n")
        stream.flush()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _FIELDS_OF_EVERY_RECORD and not k.startswith("_")}
        if record.exc_info:
            extra["exc"] = self.formatException(record.exc_info)
        return json.dumps(record_of(record.name, record.getMessage(), record.levelname.lower(), record.created,
                                    **extra), default=str)


class DaemonLog:
    """A daemon's own lines (`say`) and its modules' `logging` records, in one format on stderr."""

    def __init__(self, logger: str, log_format: str = "text", stream=None):
        if log_format not in ("text", "json"):
            raise ValueError(f"log format {log_format!r}: text or json")
        self.logger, self.structured, self.stream = logger, log_format == "json", stream
        self.lines = JsonLines(logger, stream) if self.structured else None

    def say(self, msg: str, level: str = "info", **fields) -> None:
        if self.lines is not None:
            self.lines(msg, level, **fields)
        else:
            print(f"{self.logger.replace('.', ' ')}: {msg}", file=self.stream or sys.stderr, flush=True)

    def event(self, msg: str, level: str = "info", **fields) -> None:
        """A line for machines only: written under --log-format json, silent in text (whose lines
        people read and tests of the text output pin down)."""
        if self.lines is not None:
            self.lines(msg, level, **fields)

    def capture(self, *names: str) -> None:
        """Route the named `logging` loggers (and their children) through this format."""
        if not self.structured:
            return
        handler = logging.StreamHandler(self.stream or sys.stderr)
        handler.setFormatter(_JsonFormatter())
        for name in names:
            log = logging.getLogger(name)
            log.handlers = [handler]
            log.propagate = False
