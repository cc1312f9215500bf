"""An append-only, hash-chained audit log in SQLite (WAL).

Each record's hash covers its own fields and the previous record's hash, so editing,
deleting or reordering any row breaks the chain at that row. Truncating the tail
leaves a valid but shorter chain; that is caught by the anchor file beside the
database (`<db>.anchor`: the last sequence number and hash), rewritten after every
append (or once per batch: `batch()` commits many records in one transaction, the
controller's decision loop and the event listener use it) under a lock file (`<db>.anchor.lock`) so that it only ever moves forward. A
writer creates the anchor (record 0) before the first record, so a log with rows and
no anchor has lost it: writers refuse to append to it until a person runs
`aidc audit reanchor` (an audited record of the gap).

Signing (a KMS `KeyProvider`, passed as `signer=` or named by the sidecar `<db>.signing`):
every record's hash is signed in the same transaction (table `audit_signature`), and the
anchor is signed too, under another domain-separation prefix. `verify(public_key_pem=...)`
then needs a signed anchor and a valid signature on every record after signing began, so
without the private key no rewrite of rows, hashes or the anchor passes. Only a replay of
an older genuine log *with* its older anchor is not detectable offline (see
docs/architecture.md).

Reading (`AuditLog(path, read_only=True)`, what `aidc audit` uses) opens the file with
SQLite's read-only mode: it changes no byte of it, creates nothing, and refuses a file
that is not an aidc audit log. An anchor file that is not what a writer writes is a
verification failure, and writers refuse to append (before committing) until it is fixed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from aidc import strict_json
from aidc.errors import AuditError
from aidc.files import enable_wal, private_db, private_opener, refuse_link, write_atomic
from aidc.installation import InstallationError, audit_public_key

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
# Record signatures live beside the chain, not in it: the `audit` table keeps the columns
# older logs have, and a signature row commits in the same transaction as its record.
SIGNATURE_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_signature (
    seq INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL,
    key_version INTEGER NOT NULL,
    signature TEXT NOT NULL,
    algorithm TEXT
);
"""
# The signing key's algorithm beside each signature (aidc.kms.SIGNATURE_ALGORITHMS); NULL in
# rows written before keys named theirs, which are Ed25519. Logs made then gain the column.
SIGNATURE_ALGORITHM_COLUMN = "ALTER TABLE audit_signature ADD COLUMN algorithm TEXT"
# Domain separation: a record's signature can never stand in for an anchor's (or the reverse).
RECORD_DOMAIN = b"aidc-audit-record-v1\0"
ANCHOR_DOMAIN = b"aidc-audit-anchor-v1\0"
REANCHOR_KIND = "audit.reanchor"
COLUMNS = ["seq", "ts", "actor", "node", "kind", "reason", "payload", "prev_hash", "hash"]


class BadAnchor(AuditError):
    """The anchor file exists but is not what a writer writes."""


class Anchor(NamedTuple):
    seq: int
    hash: str
    signature: dict | None = None  # {"key_id", "key_version", "value" (base64)} when signed


def signed_message(domain: bytes, seq: int, digest: str) -> bytes:
    return domain + f"{seq}\0{digest}".encode()


def signing_config_path(db: str | Path) -> Path:
    db = Path(db)
    return db.with_name(db.name + ".signing")


def configure_signing(db: str | Path, keyring: str | Path, key_id: str) -> Path:
    """Name the local keyring that signs this log, for every writer that opens it (the sidecar)."""
    path = signing_config_path(db)
    with open(path, "w", opener=private_opener) as f:  # no secret in it, but private like the log
        f.write(json.dumps({"provider": "local", "keyring": str(Path(keyring).resolve()), "key_id": key_id}))
    return path


def configured_signer(db: str | Path):
    """The KeyProvider the sidecar names, opened; None when the log has no sidecar."""
    path = signing_config_path(db)
    try:
        config = json.loads(path.read_text())
        provider, keyring, key_id = config["provider"], config["keyring"], config["key_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"signing config {path} is not one aidc writes ({exc})") from None
    if provider != "local":
        raise AuditError(f"signing config {path}: provider {provider!r}; a sidecar names a local keyring "
                         "(pass signer= for other providers)")
    from aidc.kms.local import LocalKeyring

    return LocalKeyring(keyring, key_id)


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

    @property
    def dry_run(self) -> bool:
        """Recorded by a dry-run (what would have happened): kept apart from incidents in reports."""
        p = self.payload if isinstance(self.payload, dict) else {}
        return (p.get("dry_run") is True or p.get("verdict") in ("would_quarantine", "would_quarantine_gpu")
                or self.reason.startswith("dry-run") or ".dry_run" in self.kind)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str = ""
    signed: bool = False  # checked against a public key
    notes: tuple[str, ...] = field(default=())  # re-anchors, records older than signing, a lagging anchor

    @property
    def failure(self) -> str:
        """Why it does not verify, to follow "FAILED" or "does not verify" in a sentence:
        " at record N: <problem>", or ": <problem>" where no record is to blame (a missing
        anchor, an unreadable file): never "record None"."""
        at = f" at record {self.first_bad_seq}" if self.first_bad_seq is not None else ""
        return f"{at}: {self.problem}"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "records": self.records, "first_bad_seq": self.first_bad_seq, "problem": self.problem,
                "signed": self.signed, "notes": list(self.notes)}


def record_hash(prev_hash: str, seq: int, ts: float, actor: str, node: str | None, kind: str,
                reason: str, payload_json: str) -> str:
    body = json.dumps([prev_hash, seq, repr(ts), actor, node, kind, reason, payload_json],
                      separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def chain_problem(rows: list[tuple]) -> tuple[int, str] | None:
    """(first bad seq, what is wrong) for rows in stored order; None when the chain holds."""
    prev = GENESIS
    for expected_seq, (seq, ts, actor, node, kind, reason, payload, prev_hash, digest) in enumerate(rows, 1):
        if seq != expected_seq:
            problem = "missing (deleted)" if seq > expected_seq else "out of order"
            return expected_seq, f"record {expected_seq} {problem}; found {seq}"
        if prev_hash != prev:
            return seq, f"record {seq} does not follow record {seq - 1}"
        if record_hash(prev_hash, seq, ts, actor, node, kind, reason, payload) != digest:
            return seq, f"record {seq} was changed after it was written"
        prev = digest
    return None


def default_actor(stage: str) -> str:
    return f"{stage}@{socket.gethostname()}:{os.getpid()}"


class AuditLog:
    # A batch (see batch()): its open transaction's depth and the head it has appended so far.
    _batch_depth = 0
    _batch_head: tuple[int, str] | None = None

    def __init__(self, path: str | Path, *, read_only: bool = False, signer=None):
        """`signer`: a KeyProvider that signs each record and the anchor; a writer without one
        uses the keyring the sidecar `<db>.signing` names, if there is one."""
        self.path = Path(path)
        self.read_only = read_only
        self.signer = signer
        self.anchor_path = self.path.with_name(self.path.name + ".anchor")
        self._anchor_lock_path = self.anchor_path.with_name(self.anchor_path.name + ".lock")
        # Threads may share one AuditLog (and so one connection, whose transaction state is
        # shared too): one append at a time, and no read in the middle of an append.
        self._lock = threading.RLock()  # re-entered by the appends inside a batch
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
        enable_wal(self._db)  # retried: writers open a new log at the same moment
        self._db.executescript(SCHEMA)
        self._db.executescript(SIGNATURE_SCHEMA)
        if "algorithm" not in {r[1] for r in self._db.execute("PRAGMA table_info(audit_signature)")}:
            try:
                self._db.execute(SIGNATURE_ALGORITHM_COLUMN)
            except sqlite3.OperationalError:  # another writer added it first
                pass
        if self.signer is None:
            self.signer = configured_signer(self.path)
        self._write_genesis_anchor()
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

    def use_signer(self, signer) -> None:
        """Start signing (the lab, once its keyring exists): the anchor is signed at once."""
        self.signer = signer
        head = self._head()
        self._write_anchor(*head, force=True) if head[0] else self._write_genesis_anchor(force=True)

    def close(self) -> None:
        # At every stop the anchor names the head, signed: a writer that crashed between a
        # commit and its anchor update (possibly another process) is caught up here.
        if not self.read_only:
            try:
                anchor = self._read_anchor()
                seq, digest = self._head()
                if anchor is not None and seq > anchor.seq:
                    self._write_anchor(seq, digest)
            except (AuditError, sqlite3.Error):
                pass  # a damaged anchor stays for verify to report
        self._db.close()

    def _head(self) -> tuple[int, str]:
        with self._lock:
            row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def _write_genesis_anchor(self, force: bool = False) -> None:
        """Anchor record 0 before the first record: from then on a missing anchor means a removed one."""
        refuse_link(self.anchor_path)  # exists() would follow a planted link and take it for the anchor
        with open(self._anchor_lock_path, "a", opener=private_opener) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.anchor_path.exists() and not force:
                return
            if self._head()[0] == 0:
                self._replace_anchor(0, GENESIS)

    def _check_can_append(self) -> None:
        anchor = self._read_anchor()
        if anchor is None:
            count = self._head()[0]
            if count:
                raise AuditError(self._cut_tail_refusal(count))
        elif anchor.signature is not None and self.signer is None:
            raise AuditError(self._keyless_writer_refusal())

    def _cut_tail_refusal(self, count: int) -> str:
        return (f"{self.path} holds {count} records but its anchor file {self.anchor_path} is missing: the tail "
                f"may have been cut. Nothing was written; a person must re-anchor it "
                f"(`aidc audit reanchor --db {self.path} --reason ...`), which records the gap")

    def _keyless_writer_refusal(self) -> str:
        return (f"{self.path} is signed (its anchor carries a signature) but this writer has no "
                f"signing key ({signing_config_path(self.path)} is missing); nothing was written")

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def batch(self):
        """Append many records as one commit with one anchor update (signed when signing).

        Inside the block every append joins one transaction, which commits when the block ends:
        all its records or none, one fsync instead of one per record, and the anchor (the signed
        head) rewritten once, naming the batch's last record. The caller's own store commit goes
        after the block, so a record is still durable before the state change it describes.
        Nested batches are part of the outermost one. Other threads using this AuditLog wait
        until the batch ends (its connection's transaction is the batch's)."""
        if self.read_only:
            raise AuditError(f"{self.path} was opened read-only")
        if not isinstance(self._db, sqlite3.Connection):
            yield self  # a log on another backend (a subclass) commits each append by itself
            return
        with self._lock:
            if self._batch_depth:
                self._batch_depth += 1
                try:
                    yield self
                finally:
                    self._batch_depth -= 1
                return
            self._check_can_append()  # once for the batch: the anchor is this writer's until it ends
            self._db.execute("BEGIN IMMEDIATE")
            self._batch_depth, self._batch_head = 1, None
            try:
                yield self
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                # Also after a rollback: the next append must read the head from the table.
                head, self._batch_depth, self._batch_head = self._batch_head, 0, None
        if head is not None:
            self._write_anchor(*head)

    def append(self, kind: str, reason: str, *, actor: str, node: str | None = None,
               payload: dict | None = None) -> AuditRecord:
        if self.read_only:
            raise AuditError(f"{self.path} was opened read-only")
        # Strict JSON: a non-finite float is written as its name, so every record stays readable
        # by strict consumers (and by SQLite's JSON functions).
        payload_json = strict_json.dumps(payload or {}, sort_keys=True)
        with self._lock:
            if self._batch_depth:  # checked when the batch began; it commits and anchors at its end
                record = self._insert(kind, reason, actor, node, payload_json)
                self._batch_head = (record.seq, record.hash)
                return record
        # A bad or missing anchor is refused before the record commits: failing after the
        # commit would tell the caller its record was not written when it was.
        self._check_can_append()
        return self._append(kind, reason, actor, node, payload_json)

    def _insert(self, kind: str, reason: str, actor: str, node: str | None, payload_json: str) -> AuditRecord:
        """One record (and its signature) into the open transaction (the write lock is held, so
        within a batch the head this connection appended last is the chain's head)."""
        if self._batch_head is not None:
            row = self._batch_head
        else:
            row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        ts = time.time()
        digest = record_hash(prev, seq, ts, actor, node, kind, reason, payload_json)
        self._db.execute("INSERT INTO audit(seq, ts, actor, node, kind, reason, payload, prev_hash, hash) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (seq, ts, actor, node, kind, reason, payload_json, prev, digest))
        if self.signer is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO audit_signature(seq, key_id, key_version, signature, algorithm) "
                "VALUES (?, ?, ?, ?, ?)", (seq, *self._record_signature(seq, digest)))
        return AuditRecord(seq, ts, actor, node, kind, reason, json.loads(payload_json), prev, digest)

    # What this writer's signer puts beside a record and on the anchor, the same on every backend.
    def _record_signature(self, seq: int, digest: str) -> tuple:
        """(key_id, key_version, signature, algorithm) of record `seq`."""
        return (self.signer.key_id, self.signer.signing_key_version,
                base64.b64encode(self.signer.sign(signed_message(RECORD_DOMAIN, seq, digest))).decode(),
                self.signer.signing_algorithm)

    def _anchor_signature(self, seq: int, digest: str) -> dict:
        """The anchor's signature document (key, version, algorithm, value) for head `seq`."""
        return {"key_id": self.signer.key_id, "key_version": self.signer.signing_key_version,
                "algorithm": self.signer.signing_algorithm,
                "value": base64.b64encode(self.signer.sign(signed_message(ANCHOR_DOMAIN, seq, digest))).decode()}

    def _append(self, kind: str, reason: str, actor: str, node: str | None, payload_json: str,
                force_anchor: bool = False) -> AuditRecord:
        with self._lock:
            # BEGIN IMMEDIATE serialises writers across processes: the chain has one head.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                record = self._insert(kind, reason, actor, node, payload_json)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._write_anchor(record.seq, record.hash, force=force_anchor)
        return record

    def _write_anchor(self, seq: int, digest: str, force: bool = False) -> None:
        # A writer that crashed between COMMIT and here leaves the anchor one record behind;
        # verify accepts an anchor that lags (it checks the anchored record) but not a chain
        # shorter than the anchor. Writers finish in any order, so read, compare and replace
        # happen under a lock: otherwise one could read anchor N, another write N+1, and the
        # first replace it with N, moving the anchor back so that cutting N+1 goes unseen.
        with open(self._anchor_lock_path, "a", opener=private_opener) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            if not force:  # force: a re-anchor replaces whatever is there, on purpose
                try:
                    current = self._read_anchor()
                except BadAnchor:
                    return  # replaced since append checked it: leave it for verify to report
                if current and current.seq >= seq:
                    return
            self._replace_anchor(seq, digest)

    def _replace_anchor(self, seq: int, digest: str) -> None:
        """Write the anchor (signed when there is a signer); the caller holds the anchor lock."""
        doc: dict = {"seq": seq, "hash": digest}
        if self.signer is not None:
            doc["signature"] = self._anchor_signature(seq, digest)
        # durable: on disk before the rename, so a crash cannot leave an empty anchor.
        write_atomic(self.anchor_path, json.dumps(doc), durable=True)

    def _read_anchor(self) -> Anchor | None:
        """The anchor; None when there is none; BadAnchor when it is not one."""
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
        if (type(seq) is not int or seq < 0 or not isinstance(digest, str) or len(digest) != 64
                or any(c not in "0123456789abcdef" for c in digest)):
            raise BadAnchor(f"anchor file {self.anchor_path} does not hold a record number and hash "
                            f"(found {text[:80]!r})")
        signature = data.get("signature")
        if signature is not None and not (isinstance(signature, dict) and isinstance(signature.get("value"), str)):
            raise BadAnchor(f"anchor file {self.anchor_path} has a signature field that is not a signature")
        return Anchor(seq, digest, signature)

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

    def latest_stored(self, kind: str, node: str) -> dict | None:
        """The newest record of this kind for this node as stored, the payload as its exact
        JSON text (what the record's hash covers); None when there is none."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit WHERE kind = ? AND node = ? "
                                   "ORDER BY seq DESC LIMIT 1", (kind, node)).fetchone()
        return None if row is None else dict(zip(COLUMNS, row))

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

    def verify(self, public_key_pem: str | None = None) -> VerifyResult:
        """Walk the chain; name the first record that does not hold. With a public key, also
        require a signed anchor and a valid signature on every record after signing began.

        The installation's signing key (aidc.installation: the record in the log's directory) is
        always required as well, whoever verifies: a keyless rewrite of rows, hashes, signatures,
        anchor and sidecar passes the chain checks, never that key."""
        try:
            installed = self._installed_public_key()
        except InstallationError as exc:
            return VerifyResult(False, self._count(), None, str(exc), True)
        result = self._verify(public_key_pem)
        if result.ok and installed is not None and installed != public_key_pem:
            result = self._verify(installed)
        return result

    def _installed_public_key(self) -> str | None:
        return audit_public_key(self.path)

    def _count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]

    def _verify(self, public_key_pem: str | None) -> VerifyResult:
        try:
            anchor, rows = self._anchor_and_rows()
            if anchor is None and rows:
                # A log written before genesis anchors: its first append may have committed after
                # the anchor was read. An anchor is only ever replaced, never removed: look again.
                anchor, rows = self._anchor_and_rows()
        except BadAnchor as exc:
            return VerifyResult(False, self._count(), None, str(exc), public_key_pem is not None)
        broken = chain_problem(rows)
        if broken:
            return VerifyResult(False, len(rows), *broken, signed=public_key_pem is not None)
        notes = [f"record {r[0]} re-anchored the log: {r[5]}" for r in rows if r[4] == REANCHOR_KIND]
        if anchor is not None:
            if anchor.seq > len(rows):
                return VerifyResult(False, len(rows), len(rows) + 1,
                                    f"log truncated: anchor names record {anchor.seq}, log ends at {len(rows)}")
            if (rows[anchor.seq - 1][8] if anchor.seq else GENESIS) != anchor.hash:
                return VerifyResult(False, len(rows), anchor.seq, f"record {anchor.seq} does not match the anchor")
            if anchor.seq < len(rows):
                notes.append(f"the anchor names record {anchor.seq}, the log ends at {len(rows)} "
                             f"(a writer stopped between a commit and its anchor update)")
        elif rows or public_key_pem is not None:
            return VerifyResult(False, len(rows), None, self._anchor_missing())
        if public_key_pem is None:
            return VerifyResult(True, len(rows), notes=tuple(notes))
        problem = self._signature_problem(public_key_pem, anchor, rows, notes)
        if problem:
            return VerifyResult(False, len(rows), problem[0], problem[1], True, tuple(notes))
        return VerifyResult(True, len(rows), signed=True, notes=tuple(notes))

    def _signature_problem(self, public_key_pem: str, anchor: Anchor, rows: list[tuple],
                           notes: list[str]) -> tuple[int | None, str] | None:
        from aidc.kms import verify_with_pem

        def valid(domain: bytes, seq: int, digest: str, value: str, algorithm) -> bool:
            try:
                signature = base64.b64decode(value, validate=True)
            except ValueError:
                return False
            if algorithm is not None and not isinstance(algorithm, str):
                return False
            return verify_with_pem(public_key_pem, signed_message(domain, seq, digest), signature, algorithm)

        if anchor.signature is None:
            return anchor.seq or None, f"the anchor (record {anchor.seq}) is not signed"
        if not valid(ANCHOR_DOMAIN, anchor.seq, anchor.hash, anchor.signature["value"],
                     anchor.signature.get("algorithm")):
            return (anchor.seq or None,
                    f"the anchor's signature (record {anchor.seq}) does not verify with this public key")
        signatures = self._signatures()
        # Records up to the anchor are covered by its signature through the chain; every record
        # after the first signed one, and every record past the anchor, must carry its own.
        first_signed = min((s for s in signatures if 1 <= s <= len(rows)), default=None)
        must_sign_after = anchor.seq if first_signed is None else min(first_signed - 1, anchor.seq)
        for seq, *_, digest in rows:
            value, algorithm = signatures.get(seq, (None, None))
            if value is None:
                if seq > must_sign_after:
                    return seq, f"record {seq} is not signed (written without the signing key)"
            elif not valid(RECORD_DOMAIN, seq, digest, value, algorithm):
                return seq, f"record {seq}'s signature does not verify with this public key"
        if must_sign_after:
            notes.append(f"records 1-{must_sign_after} precede the first record signature; "
                         f"the signed anchor covers them through the chain")
        return None

    def _anchor_missing(self) -> str:
        return f"anchor file {self.anchor_path} is missing"

    def _signatures(self) -> dict[int, tuple[str, str | None]]:
        """(signature, algorithm) of each record by seq; none when the log predates the signature
        table, algorithm None (Ed25519) in rows written before keys named theirs."""
        with self._lock:
            has_table = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                         "name = 'audit_signature'").fetchone()
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(audit_signature)")} if has_table else set()
            # A log from before the algorithm column (read-only, so not migrated): all Ed25519.
            algorithm = "algorithm" if "algorithm" in columns else "NULL"
            return {seq: (value, alg) for seq, value, alg in self._db.execute(
                f"SELECT seq, signature, {algorithm} FROM audit_signature").fetchall()} if has_table else {}

    def _stored_rows(self) -> list[tuple]:
        """Every record's columns in physical order (rowid), not seq order: verify must see rows
        as they are stored."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, ts, actor, node, kind, reason, payload, prev_hash, hash FROM audit ORDER BY rowid"
            ).fetchall()

    def reanchor(self, reason: str, *, actor: str) -> AuditRecord:
        """A person's decision: accept the chain as it stands, record why, and anchor it again.

        Refused when the chain itself is broken (re-anchoring would bless an edited record) and
        when the log verifies (nothing to re-anchor). The record names what was wrong, so the
        gap stays visible in the log."""
        if self.read_only:
            raise AuditError(f"{self.path} was opened read-only")
        if not reason.strip():
            raise AuditError("a re-anchor needs a reason")
        rows = self._stored_rows()
        broken = chain_problem(rows)
        if broken:
            raise AuditError(f"{self.path}: the chain itself is broken at record {broken[0]} ({broken[1]}); "
                             "a re-anchor would accept that record, so it is refused")
        # The chain and anchor only: a re-anchor accepts a missing or damaged anchor, and is no
        # way to bless records whose signatures fail.
        result = self._verify(None)
        if result.ok:
            raise AuditError(f"{self.path} verifies ({result.records} records, anchor in place): nothing to re-anchor")
        try:
            previous = self._read_anchor()
            previous_anchor = None if previous is None else {"seq": previous.seq, "hash": previous.hash}
        except BadAnchor as exc:
            previous_anchor = {"unreadable": str(exc)}
        head_seq, head_hash = (rows[-1][0], rows[-1][8]) if rows else (0, GENESIS)
        payload = {"problem": result.problem, "previous_anchor": previous_anchor,
                   "records_found": len(rows), "head_seq": head_seq, "head_hash": head_hash}
        return self._append(REANCHOR_KIND, reason, actor, None, strict_json.dumps(payload, sort_keys=True),
                            force_anchor=True)

    def _anchor_and_rows(self) -> tuple[tuple[int, str] | None, list[tuple]]:
        # The anchor first: it is written only after its record is committed, so rows read
        # afterwards include the anchored one even while others append. Read the other way
        # round, an append landing in between looks like a truncated log.
        anchor = self._read_anchor()
        return anchor, self._stored_rows()
