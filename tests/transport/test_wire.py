"""The transport's request format: what the controller accepts, and every way it refuses."""

from __future__ import annotations

import json

import pytest

from aidc.events import Action, FaultEvent, FaultKind
from aidc.transport import wire

KEY = "gpu-1:" + "ab" * 16 + ":7"


def event(**overrides) -> FaultEvent:
    base = dict(node="gpu-1", kind=FaultKind.XID, action=Action.REBOOT_NODE, message="XID 79", source="kmsg",
                gpu=0, pci="0000:17:00.0", xid=79, line="NVRM: Xid (PCI:0000:17:00): 79", observed_at=1.5)
    return FaultEvent(**{**base, **overrides})


def body(*items) -> bytes:
    return json.dumps({"events": list(items)}).encode()


def item(key=KEY, **fields) -> dict:
    data = json.loads(event().to_json())
    data.update(fields)
    return {"key": key, "event": data}


def test_a_batch_round_trips_unchanged():
    batch = [(KEY, event()), ("gpu-1:" + "ab" * 16 + ":8", event(kind=FaultKind.DEVICE_HANG, gpu=None, xid=None))]
    assert wire.decode(wire.encode(batch)) == batch


@pytest.mark.parametrize("raw, says", [
    (b"{", "malformed JSON"),
    (b'{"events": [' + json.dumps(item()).encode()[:-1] + b', "x": NaN}]}', "NaN is not JSON"),
    (body(item(observed_at=1e400)), "Infinity is not JSON"),
    (b'{"events": []}', "expected 1 to"),
    (b'{"events": [], "extra": 1}', 'expected {"events"'),
    (body(item(extra="x")), "unknown field(s) extra"),
    (body({"key": KEY, "event": {"node": "gpu-1"}}), "missing field(s)"),
    (body(item(kind="melted")), "unknown kind"),
    (body(item(gpu=True)), "gpu: expected a non-negative integer"),
    (body(item(xid="79")), "xid: expected a non-negative integer"),
    (body(item(message="x" * (wire.MAX_TEXT + 1))), "message: expected a string"),
    (body(item(node="")), "node: expected a string"),
    (body(item(key="gpu-2:" + "ab" * 16 + ":7")), "key: expected '<node>:<store id>:<event id>' for node 'gpu-1'"),
    (body(item(key="gpu-1:not-a-store-id:7")), "key: expected"),
    (body(*[item(key=f"gpu-1:{'ab' * 16}:{i}") for i in range(wire.MAX_BATCH + 1)]), "expected 1 to"),
])
def test_invalid_requests_are_refused_with_the_reason(raw, says):
    with pytest.raises(wire.WireError) as err:
        wire.decode(raw)
    assert says in str(err.value)

