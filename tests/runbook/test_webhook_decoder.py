"""Property tests for what the receiver decodes from the network: the request head and the
webhook payload. Whatever the bytes, no exception escapes but the refusal the server turns into
a 4xx/5xx, and everything accepted is something the engine and every JSON listing can take.

Bounded for CI by example counts (not wall-clock deadlines): a few hundred examples each.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aidc.runbook.http_server import HTTPError, parse_head
from aidc.runbook.receiver import STRING_FIELDS, BadRequest, validate_payload

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values as Python's json module would write them, NaN and infinities included.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30)

labels = st.dictionaries(st.text(max_size=15), st.text(max_size=15) | json_values, max_size=5)
alerts = st.fixed_dictionaries(
    {"labels": labels},
    optional={"status": st.sampled_from(["firing", "resolved"]) | json_values, "fingerprint": st.text(max_size=16) | json_values,
              "startsAt": st.text(max_size=25) | json_values, "annotations": json_values})
payloads = st.fixed_dictionaries({"alerts": st.lists(alerts, max_size=8)},
                                 optional={"version": st.just("4"), "status": st.text(max_size=8)}) | json_values


def assert_valid_alerts(result: list, max_alerts: int) -> None:
    assert isinstance(result, list) and len(result) <= max_alerts
    for alert in result:
        assert isinstance(alert, dict) and isinstance(alert["labels"], dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in alert["labels"].items())
        assert all(alert.get(name) is None or isinstance(alert[name], str) for name in STRING_FIELDS)
    # Strict JSON round trip: nothing accepted can hold NaN or Infinity.
    json.dumps(result, allow_nan=False)


@BOUNDED
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_valid_alerts_or_a_400(body):
    try:
        result = validate_payload(body)
    except BadRequest as exc:
        assert exc.code == 400 and exc.reason
    else:
        assert_valid_alerts(result, 1000)


@BOUNDED
@given(payloads, st.integers(min_value=1, max_value=6))
def test_any_json_document_decodes_to_valid_alerts_or_a_refusal(doc, max_alerts):
    body = json.dumps(doc).encode()  # allow_nan: the NaN/Infinity a lenient sender would write
    try:
        result = validate_payload(body, max_alerts)
    except BadRequest as exc:
        assert exc.code in (400, 413) and exc.reason
        if exc.code == 413:
            assert len(doc["alerts"]) > max_alerts
    else:
        assert_valid_alerts(result, max_alerts)
        assert result == doc["alerts"]


def has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


@BOUNDED
@given(payloads)
def test_a_payload_holding_nan_or_infinity_anywhere_is_refused(doc):
    body = json.dumps(doc).encode()
    if not has_non_finite(doc):
        return
    try:
        validate_payload(body, 10**6)
    except BadRequest as exc:
        assert exc.code == 400
    else:
        raise AssertionError(f"accepted a payload with a non-finite number: {body[:200]!r}")


header_lines = st.lists(
    st.tuples(st.sampled_from(["Host", "Content-Length", "content-length", "Authorization", "Transfer-Encoding",
                               "Expect", "X-Any", "Bad Name", ""]),
              st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=20)),
    max_size=6)


@BOUNDED
@given(st.sampled_from(["POST", "GET", "PUT", "", "P OST"]), st.text(max_size=20),
       st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1", "http/1.1"]), header_lines)
def test_any_request_head_parses_to_one_framing_or_a_refusal(method, target, version, headers):
    head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    try:
        request = parse_head(head.rstrip("\r\n").encode())
    except HTTPError as exc:
        assert exc.code in (400, 501, 505) and exc.reason
        return
    # Accepted: exactly one way to read the body's length, and no Transfer-Encoding to second-guess it.
    lengths = request.headers.get("content-length", [])
    assert len(lengths) <= 1 and "transfer-encoding" not in request.headers
    assert request.content_length == (int(lengths[0]) if lengths else None)
    assert request.content_length is None or request.content_length >= 0
    assert len(request.headers.get("authorization", [])) <= 1


@BOUNDED
@given(st.binary(max_size=200))
def test_any_bytes_as_a_request_head_parse_or_are_refused(data):
    try:
        parse_head(data)
    except HTTPError as exc:
        assert exc.code in (400, 501, 505)
