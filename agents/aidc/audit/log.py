"""An append-only, hash-chained audit log in SQLite (WAL).

Each record's hash covers its own fields and the previous record's hash, so editing,
deleting or reordering any row breaks the chain at that row. Truncating the tail
leaves a valid but shorter chain; that is caught by the anchor file beside the
database (`<db>.anchor`: the last sequence number and hash), rewritten after every
append under a lock file (`<db>.anchor.lock`) so that it only ever moves forward. An
attacker who rewrites the whole chain *and* the anchor is not caught here: signing
anchors with the cluster KMS key is the next layer (docs/architecture.md).

Reading (`AuditLog(path, read_only=True)`, what `aidc audit` uses) opens the file with
SQLite's read-only mode: it changes no byte of it, creates nothing, and refuses a file
that is not an aidc audit log. An anchor file that is not what a writer writes is a
verification failure, and writers refuse to append (before committing) until it is fixed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from aidc import strict_json
from aidc.errors import AuditError
from aidc.files import private_db, private_opener

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    node TEXT,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""
# find(kind, run_id=...) runs on every resumed runbook run: without it each look reads the
# whole log. An index, not part of the chain; a log whose payloads are not all JSON (edited
# by hand) cannot have it, and is read without it.
# Payload lookups guard json_extract with json_valid: a row written by older code may hold
# Python's non-standard NaN/Infinity, which SQLite's JSON functions reject ("malformed JSON").
PAYLOAD_FIELD = "CASE WHEN json_valid(payload) THEN json_extract(payload, '$.{key}') END"
RUN_INDEX = f"CREATE INDEX IF NOT EXISTS audit_kind_run ON audit(kind, {PAYLOAD_FIELD.format(key='run_id')})"
COLUMNS = ["seq", "ts", "actor", "node", "kind", "reason", "payload", "prev_hash", "hash"]


class BadAnchor(AuditError):
    """The anchor file exists but is not what a writer writes."""


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    ts: float
    actor: str
    node: str | None
    kind: str
    reason: str
    payload: dict
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str = ""

    def to_dict(self) -> dict:
        return {"ok": self.ok, "records": self.records, "first_bad_seq": self.first_bad_seq, "problem": self.problem}


def record_hash(prev_hash: str, seq: int, ts: float, actor: str, node: str | None, kind: str,
                reason: str, payload_json: str) -> str:
    body = json.dumps([prev_hash, seq, repr(ts), actor, node, kind, reason, payload_json],
                      separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def default_actor(stage: str) -> str:
    return f"{stage}@{socket.gethostname()}:{os.getpid()}"


class AuditLog:
    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.anchor_path = self.path.with_name(self.path.name + ".anchor")
        self._anchor_lock_path = self.anchor_path.with_name(self.anchor_path.name + ".lock")
        # Threads may share one AuditLog (and so one connection, whose transaction state is
        # shared too): one append at a time, and no read in the middle of an append.
        self._lock = threading.Lock()
        if read_only:
            if not self.path.is_file():
                raise AuditError(f"no audit database at {self.path}" if not self.path.exists()
                                 else f"{self.path} is not a file, so not an audit database (SQLite file)")
            # mode=ro: no journal-mode change, no table created, no byte of the file written.
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            self._check_is_audit_log(create=False)
            return
        private_db(self.path)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._check_is_audit_log(create=True)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        try:
            self._db.execute(RUN_INDEX)
        except sqlite3.OperationalError:  # malformed JSON in some payload: verify names that record
            pass

    def _check_is_audit_log(self, create: bool) -> None:
        """Refuse another program's database: never read it as a log, never add a table to it."""
        try:
            tables = [r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            columns = [r[1] for r in self._db.execute("PRAGMA table_info(audit)")] if "audit" in tables else []
        except sqlite3.Error as exc:
            self._db.close()
            raise AuditError(f"{self.path} is not an audit database ({exc})") from None
        if columns == COLUMNS or (create and not tables):
            return
        self._db.close()
        found = (f"its `audit` table has columns {columns}" if "audit" in tables
                 else f"it holds tables {sorted(tables)} and no `audit` table" if tables else "it is empty")
        raise AuditError(f"{self.path} is not an aidc audit log: {found}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, kind: str, reason: str, *, actor: str, node: str | None = None,
               payload: dict | None = None) -> AuditRecord:
        if self.read_only:
            raise AuditError(f"{self.path} was opened read-only")
        # Strict JSON: a non-finite float is written as its name, so every record stays readable
        # by strict consumers (and by SQLite's JSON functions).
        payload_json = strict_json.dumps(payload or {}, sort_keys=True)
        # A bad anchor is refused before the record commits: failing after the commit would
        # tell the caller its record was not written when it was.
        self._read_anchor()
        with self._lock:
            # BEGIN IMMEDIATE serialises writers across processes: the chain has one head.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
                ts = time.time()
                digest = record_hash(prev, seq, ts, actor, node, kind, reason, payload_json)
                self._db.execute(
                    "INSERT INTO audit(seq, ts, actor, node, kind, reason, payload, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, ts, actor, node, kind, reason, payload_json, prev, digest),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._write_anchor(seq, digest)
        return AuditRecord(seq, ts, actor, node, kind, reason, json.loads(payload_json), prev, digest)

    def _write_anchor(self, seq: int, digest: str) -> None:
        # A writer that crashed between COMMIT and here leaves the anchor one record behind;
        # verify accepts an anchor that lags (it checks the anchored record) but not a chain
        # shorter than the anchor. Writers finish in any order, so read, compare and replace
        # happen under a lock: otherwise one could read anchor N, another write N+1, and the
        # first replace it with N, moving the anchor back so that cutting N+1 goes unseen.
        with open(self._anchor_lock_path, "a", opener=private_opener) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            try:
                current = self._read_anchor()
            except BadAnchor:
                return  # replaced since append checked it: leave it for verify to report
            if current and current[0] >= seq:
                return
            tmp = self.anchor_path.with_name(f"{self.anchor_path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            with open(tmp, "w", opener=private_opener) as f:
                f.write(json.dumps({"seq": seq, "hash": digest}))
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash must not leave an empty anchor
            os.replace(tmp, self.anchor_path)

    def _read_anchor(self) -> tuple[int, str] | None:
        """(seq, hash) of the anchor; None when there is none yet; BadAnchor when it is not one."""
        try:
            text = self.anchor_path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise BadAnchor(f"anchor file {self.anchor_path} cannot be read: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise BadAnchor(f"anchor file {self.anchor_path} is not JSON") from None
        seq, digest = (data.get("seq"), data.get("hash")) if isinstance(data, dict) else (None, None)
        if (type(seq) is not int or seq < 1 or not isinstance(digest, str) or len(digest) != 64
                or any(c not in "0123456789abcdef" for c in digest)):
            raise BadAnchor(f"anchor file {self.anchor_path} does not hold a record number and hash "
                            f"(found {text[:80]!r})")
        return seq, digest

    def records(self, kind: str | None = None, node: str | None = None) -> list[AuditRecord]:
        # Physical order (rowid), not seq order: verify must see rows as they are stored.
        sql, args, where = "SELECT seq, ts, actor, node, kind, reason, payload, prev_hash, hash FROM audit", [], []
        if kind:
            where.append("kind = ?"), args.append(kind)
        if node:
            where.append("node = ?"), args.append(node)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq", args).fetchall()
        out = []
        for seq, ts, actor, nd, kd, reason, payload, prev, digest in rows:
            try:
                data = json.loads(payload)
            except ValueError:
                data = {"_unparseable": payload}
            out.append(AuditRecord(seq, ts, actor, nd, kd, reason, data, prev, digest))
        return out

    def find(self, kind: str, **payload) -> list[AuditRecord]:
        """Records of this kind whose payload has these top-level values, in order."""
        sql, args = ("SELECT seq, ts, actor, node, kind, reason, payload, prev_hash, hash FROM audit "
                     "WHERE kind = ?"), [kind]
        for key, value in payload.items():
            if not key.isidentifier():
                raise ValueError(f"payload key {key!r} is not a plain name")
            sql += f" AND {PAYLOAD_FIELD.format(key=key)} = ?"
            args.append(value)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq", args).fetchall()
        return [AuditRecord(seq, ts, actor, nd, kd, reason, json.loads(data), prev, digest)
                for seq, ts, actor, nd, kd, reason, data, prev, digest in rows]

    def verify(self) -> VerifyResult:
        """Walk the chain; name the first record that does not hold."""
        try:
            anchor, rows = self._anchor_and_rows()
            if anchor is None and rows:
                # The very first append may have committed after the anchor was read. Once written,
                # the anchor file is only ever replaced, never removed, so one more look decides.
                anchor, rows = self._anchor_and_rows()
        except BadAnchor as exc:
            with self._lock:
                count = self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            return VerifyResult(False, count, None, str(exc))
        prev = GENESIS
        for expected_seq, (seq, ts, actor, node, kind, reason, payload, prev_hash, digest) in enumerate(rows, 1):
            if seq != expected_seq:
                problem = "missing (deleted)" if seq > expected_seq else "out of order"
                return VerifyResult(False, len(rows), expected_seq, f"record {expected_seq} {problem}; found {seq}")
            if prev_hash != prev:
                return VerifyResult(False, len(rows), seq, f"record {seq} does not follow record {seq - 1}")
            if record_hash(prev_hash, seq, ts, actor, node, kind, reason, payload) != digest:
                return VerifyResult(False, len(rows), seq, f"record {seq} was changed after it was written")
            prev = digest
        if anchor:
            a_seq, a_hash = anchor
            if a_seq > len(rows):
                return VerifyResult(False, len(rows), len(rows) + 1,
                                    f"log truncated: anchor names record {a_seq}, log ends at {len(rows)}")
            if rows[a_seq - 1][8] != a_hash:
                return VerifyResult(False, len(rows), a_seq, f"record {a_seq} does not match the anchor")
        elif rows:
            return VerifyResult(False, len(rows), None, f"anchor file {self.anchor_path} is missing")
        return VerifyResult(True, len(rows))

    def _anchor_and_rows(self) -> tuple[tuple[int, str] | None, list[tuple]]:
        # The anchor first: it is written only after its record is committed, so rows read
        # afterwards include the anchored one even while others append. Read the other way
        # round, an append landing in between looks like a truncated log.
        anchor = self._read_anchor()
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, ts, actor, node, kind, reason, payload, prev_hash, hash FROM audit ORDER BY rowid"
            ).fetchall()
        return anchor, rows
