"""How commands report: human text by default, one JSON document with --json."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

import typer

from aidc.errors import AidcError

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document for machines instead of text.")
# The daemons' liveness threshold (aidc.probes): one spelling for the agent, controller and receiver.
STALL_AFTER_OPTION = typer.Option(30.0, "--stall-after", min=0.1, max=3600,
                                  help="Seconds without a main-loop turn before /healthz (and /readyz) "
                                       "answer 503: a stuck loop fails the liveness probe.")


def _dumps(data: Any, **kwargs) -> str:
    # allow_nan=False: NaN/Infinity are not JSON, and a consumer's parser would reject the whole
    # document; refuse to print it rather than emit something that only looks like JSON.
    try:
        return json.dumps(data, default=str, allow_nan=False, **kwargs)
    except ValueError as exc:
        raise AidcError(f"cannot print as JSON: {exc}") from None


def timestamp(ts: float | None) -> str:
    """A record's time for people: UTC, ISO 8601, milliseconds (logs from many hosts line up)."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        sys.stdout.write(_dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        typer.echo(text if text is not None else json.dumps(data, indent=2, default=str))


def emit_lines(items: list[dict]) -> None:
    """JSON Lines: one object per line, for streams of events."""
    for item in items:
        sys.stdout.write(_dumps(item, sort_keys=True) + "\n")


def check_listen_address(address: str) -> None:
    """--listen-address is an IP address (a name or anything else is a usage error)."""
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise typer.BadParameter(f"an IP address (127.0.0.1, 0.0.0.0, ::, or the pod IP), not {address!r}",
                                 param_hint="--listen-address") from None
