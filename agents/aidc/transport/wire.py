"""The transport's request: a batch of keyed fault events, as strict JSON.

`POST /v1/events` with `{"events": [{"key": "<node>:<store id>:<event id>", "event": {...}}]}`.
The controller validates every field against `FaultEvent`'s types before anything is stored:
unknown or missing fields, wrong types, NaN/Infinity, over-long text, and a key that does not
start with the event's node are refused. The key's node prefix matters: keys are unique across
the cluster, so a node that could choose any key could pre-empt another node's events.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields

from aidc.events import Action, FaultEvent, FaultKind

PATH = "/v1/events"
MAX_BODY_BYTES = 1 << 20
MAX_BATCH = 200
MAX_TEXT = 8192  # message / kernel line: a real one is a few hundred characters
KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}:[0-9a-f]{32}:[0-9]{1,19}$")


class WireError(ValueError):
    """The request is not a valid batch of fault events (the reason is sent back, 400)."""


def encode(batch: list[tuple[str, FaultEvent]]) -> bytes:
    items = [{"key": key, "event": json.loads(event.to_json())} for key, event in batch]
    return json.dumps({"events": items}, allow_nan=False, sort_keys=True).encode()


def _no_constants(name: str):
    raise WireError(f"{name} is not JSON")


_OPTIONAL_INT = ("gpu", "xid")
_OPTIONAL_TEXT = ("pci", "line")
_TEXT = ("node", "message", "source")
_FIELDS = {f.name for f in fields(FaultEvent)}


def _event(data: object, where: str) -> FaultEvent:
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected an object")
    unknown, missing = set(data) - _FIELDS, {"node", "kind", "action", "message", "source"} - set(data)
    if unknown:
        raise WireError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if missing:
        raise WireError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    for name in _TEXT + _OPTIONAL_TEXT:
        value = data.get(name)
        if value is None and name in _OPTIONAL_TEXT:
            continue
        if not isinstance(value, str) or len(value) > MAX_TEXT or (name == "node" and not value):
            raise WireError(f"{where}.{name}: expected a string of at most {MAX_TEXT} characters")
    for name in _OPTIONAL_INT:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31):
            raise WireError(f"{where}.{name}: expected a non-negative integer or null")
    try:
        kind, action = FaultKind(data["kind"]), Action(data["action"])
    except (ValueError, TypeError):
        raise WireError(f"{where}: unknown kind {data['kind']!r} or action {data['action']!r}") from None
    observed = data.get("observed_at", 0.0)
    if isinstance(observed, bool) or not isinstance(observed, (int, float)) or not math.isfinite(observed):
        raise WireError(f"{where}.observed_at: expected a number (seconds since the epoch)")
    return FaultEvent(**{**data, "kind": kind, "action": action, "observed_at": float(observed)})


def decode(body: bytes) -> list[tuple[str, FaultEvent]]:
    """The batch in a request body, or WireError naming the first thing wrong with it."""
    try:
        doc = json.loads(body, parse_constant=_no_constants)
    except WireError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise WireError("malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict) or set(doc) != {"events"} or not isinstance(doc["events"], list):
        raise WireError('expected {"events": [...]}')
    if not 1 <= len(doc["events"]) <= MAX_BATCH:
        raise WireError(f"expected 1 to {MAX_BATCH} events, got {len(doc['events'])}")
    batch = []
    for i, item in enumerate(doc["events"]):
        where = f"events[{i}]"
        if not isinstance(item, dict) or set(item) != {"key", "event"}:
            raise WireError(f'{where}: expected {{"key": ..., "event": {{...}}}}')
        key, event = item["key"], _event(item["event"], f"{where}.event")
        if not isinstance(key, str) or not KEY_RE.match(key) or not key.startswith(event.node + ":"):
            raise WireError(f"{where}.key: expected '<node>:<store id>:<event id>' for node {event.node!r}")
        batch.append((key, event))
    return batch
