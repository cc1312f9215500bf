"""JSON as the standard defines it: no NaN, no Infinity, in either direction.

Python's json module reads and writes the non-standard constants `NaN`, `Infinity` and
`-Infinity` by default. Accepting one from a client stores a value that strict consumers
(jq, Go, the CLI's own `--json`, which refuses to print them) then reject, taking every
document it appears in with it. `loads` refuses them at the door; `finite` makes data that
may already hold one (an old database row) printable, naming the value instead.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def loads(text: str | bytes) -> Any:
    """json.loads that raises ValueError on NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_refuse_constant)


def finite(data: Any) -> Any:
    """`data` with every non-finite float replaced by its name as a string ("NaN", "Infinity", "-Infinity")."""
    if isinstance(data, float) and not math.isfinite(data):
        return "NaN" if math.isnan(data) else ("Infinity" if data > 0 else "-Infinity")
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def dumps(data: Any, **kwargs) -> str:
    """Strict JSON of `data`, non-finite floats named (see `finite`), anything else unknown as str()."""
    return json.dumps(finite(data), allow_nan=False, default=str, **kwargs)
