"""How commands report: human text by default, one JSON document with --json."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document for machines instead of text.")


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    else:
        typer.echo(text if text is not None else json.dumps(data, indent=2, default=str))


def emit_lines(items: list[dict]) -> None:
    """JSON Lines: one object per line, for streams of events."""
    for item in items:
        sys.stdout.write(json.dumps(item, sort_keys=True, default=str) + "\n")
