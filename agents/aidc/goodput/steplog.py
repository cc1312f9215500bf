"""The job-side step log: one JSON object per line, appended by the job (and by whoever
knows of its faults), read by `aidc goodput report|advise|serve`.

The schema is documented in docs/goodput-steplog.md; `read_step_log` enforces it, so a
log that does not follow it is one clear error, never a wrong figure.

Writes are single `os.write` calls on an O_APPEND descriptor, one whole line each: the
job's rank 0, its background checkpoint writer and an outside fault reporter (the lab, a
controller) may append to one file at once without interleaving lines.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from aidc.errors import AidcError
from aidc.files import SHARED_MODE, append_bytes

SCHEMA_VERSION = 1
# Bound what one reader takes in: a step log of a long job is large, but not without limit.
MAX_BYTES = 1 << 30
MAX_LINE = 64 * 1024


class StepLogError(AidcError):
    """A step log is missing, unreadable or does not follow its schema."""


# kind -> {field: (types, required)}; every record also has v, kind and t.
_NUM = (int, float)
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "allocation": {"job": ((str,), True)},
    "start": {"resumed_from": ((int,), True), "world": ((list,), False), "restart_count": ((int,), False)},
    "step": {"step": ((int,), True), "t0": (_NUM, True), "t1": (_NUM, True)},
    "checkpoint": {"step": ((int,), True), "t0": (_NUM, True), "t1": (_NUM, True), "mode": ((str,), True),
                   "bytes": ((int,), False)},
    "checkpoint_durable": {"step": ((int,), True), "write_s": (_NUM, True)},
    "fault": {"node": ((str,), False), "detected_t": (_NUM, False), "what": ((str,), False)},
    "end": {},
}


class StepLog:
    """Append records to a job's step log.

        log = StepLog("train/goodput.jsonl", job="llm-7b")
        log.allocation()                      # once, when the job's nodes were given to it
        log.start(resumed_from=step0)         # every (re)start, once training can begin
        with log.step(n): ...                 # or log.step_done(n, t0, t1)
        log.checkpoint(n, t0, t1, mode="async")
        log.end()
    """

    def __init__(self, path: str | os.PathLike, job: str, clock: Callable[[], float] = time.time):
        self.path, self.job, self.clock = Path(path), job, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _write(self, kind: str, t: float | None = None, **fields: Any) -> dict:
        record = {"v": SCHEMA_VERSION, "kind": kind, "t": self.clock() if t is None else t,
                  **{k: v for k, v in fields.items() if v is not None}}
        line = (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            append_bytes(self.path, line, SHARED_MODE)
        return record

    def allocation(self, t: float | None = None) -> dict:
        return self._write("allocation", t, job=self.job)

    def start(self, resumed_from: int, world: list[str] | None = None, restart_count: int | None = None,
              t: float | None = None) -> dict:
        return self._write("start", t, resumed_from=resumed_from, world=world, restart_count=restart_count)

    def step_done(self, step: int, t0: float, t1: float) -> dict:
        return self._write("step", t1, step=step, t0=t0, t1=t1)

    def step(self, step: int) -> "_Timed":
        return _Timed(lambda t0, t1: self.step_done(step, t0, t1), self.clock)

    def checkpoint(self, step: int, t0: float, t1: float, mode: str, size: int | None = None) -> dict:
        """Training stood still from t0 to t1 for this checkpoint (for an asynchronous one:
        the in-memory snapshot and any wait for the previous write)."""
        return self._write("checkpoint", t1, step=step, t0=t0, t1=t1, mode=mode, bytes=size)

    def checkpoint_durable(self, step: int, write_s: float, t: float | None = None) -> dict:
        """The checkpoint of `step` is on storage (renamed into place) at t."""
        return self._write("checkpoint_durable", t, step=step, write_s=write_s)

    def fault(self, t: float, node: str | None = None, detected_t: float | None = None,
              what: str | None = None) -> dict:
        """A fault that stopped the job happened at t (and was detected at detected_t)."""
        return self._write("fault", t, node=node, detected_t=detected_t, what=what)

    def end(self, t: float | None = None) -> dict:
        return self._write("end", t)


class _Timed:
    def __init__(self, done: Callable[[float, float], dict], clock: Callable[[], float]):
        self.done, self.clock = done, clock

    def __enter__(self) -> "_Timed":
        self.t0 = self.clock()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:  # a step that raised did not complete: it is not logged
            self.done(self.t0, self.clock())


def read_step_log(path: str | os.PathLike, tolerate_partial_tail: bool = True) -> list[dict]:
    """Every record of a step log, checked against the schema, in file order.

    A last line without its newline is a record being written right now and is skipped
    (`tolerate_partial_tail`); any other bad line is a StepLogError naming file and line."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StepLogError(f"{path}: no step log there (the job writes it with aidc.goodput.StepLog; "
                           "see docs/goodput-steplog.md)") from None
    except OSError as exc:
        raise StepLogError(f"{path}: cannot read the step log: {exc.strerror or exc}") from None
    if path.is_dir():
        raise StepLogError(f"{path}: is a directory, not a step log")
    if size > MAX_BYTES:
        raise StepLogError(f"{path}: step log is {size} bytes, over the {MAX_BYTES} this reader takes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StepLogError(f"{path}: cannot read the step log: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    partial = lines.pop()  # b"" when the file ends with a newline
    if partial and not tolerate_partial_tail:
        lines.append(partial)
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        records.append(parse_record(raw, f"{path}:{number}"))
    if not records:
        raise StepLogError(f"{path}: the step log has no records")
    return records


def parse_record(raw: bytes, where: str) -> dict:
    if len(raw) > MAX_LINE:
        raise StepLogError(f"{where}: line longer than {MAX_LINE} bytes")
    try:
        record = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StepLogError(f"{where}: not a JSON object ({str(exc)[:80]})") from None
    if not isinstance(record, dict):
        raise StepLogError(f"{where}: not a JSON object")
    if record.get("v") != SCHEMA_VERSION:
        raise StepLogError(f"{where}: schema version {record.get('v')!r}, this reader knows {SCHEMA_VERSION}")
    kind = record.get("kind")
    if kind not in _FIELDS:
        raise StepLogError(f"{where}: unknown kind {kind!r} (one of {', '.join(_FIELDS)})")
    _check(record, "t", _NUM, True, where)
    for name, (types, required) in _FIELDS[kind].items():
        _check(record, name, types, required, where)
    if kind in ("step", "checkpoint") and record["t1"] < record["t0"]:
        raise StepLogError(f"{where}: {kind} ends (t1) before it starts (t0)")
    return record


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _check(record: dict, name: str, types: tuple[type, ...], required: bool, where: str) -> None:
    if name not in record:
        if required:
            raise StepLogError(f"{where}: {record['kind'] if 'kind' in record else 'record'} record lacks {name!r}")
        return
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise StepLogError(f"{where}: {name!r} is {type(value).__name__}, expected "
                           f"{' or '.join(t.__name__ for t in types)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise StepLogError(f"{where}: {name!r} is not finite")
    if name in ("step", "resumed_from") and value < 0:
        raise StepLogError(f"{where}: {name!r} is negative")
