"""The audit log on PostgreSQL (`state.backend: postgres`): the chain every controller replica
and runbook engine appends to.

The records, their hashes and signatures are the SQLite log's, byte for byte (same record_hash,
same signed messages); what changes is the anchor. Beside a SQLite file it is a file; here it is
the row `audit_anchor` (the head: newest seq and hash, signed under the anchor domain when the
log is signed), and it moves in the same transaction that appends the record. Appenders
serialise on a transaction-scoped advisory lock, so the chain has one head across hosts, and
the anchor never lags.

Tamper-evidence: anyone who can write the database can rewrite rows, hashes and the anchor row
together, as anyone who can write the SQLite file and its anchor can; deleting the tail leaves
the anchor naming a record that is gone. With a signing key (a KMS), every record and the head
are signed, and `verify(public_key_pem=...)` (and the installation's key) accepts nothing the
key did not sign: a rewrite, a truncation with a forged head, or a head moved back without its
rows all fail. What no offline check can tell is a restore of an older genuine database whole
(rows and signed head together), as with a SQLite log and its older anchor. Updates and deletes
of records are also refused by a trigger (defence in depth: the table owner can drop it).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from aidc import strict_json
from aidc.audit.log import (COLUMNS, GENESIS, Anchor, AuditLog, AuditRecord,
                            BadAnchor, record_hash)
from aidc.errors import AuditError, StateError

# pg_advisory_xact_lock key for appending to the chain: the same number in every replica.
APPEND_LOCK = 0x61696463_61756474  # "aidcaudt"
SCHEMA_VERSION = 2  # migration 0002_audit_log


class PostgresAuditLog(AuditLog):
    def __init__(self, dsn: str, *, read_only: bool = False, signer=None, state_dir: str | Path | None = None):
        """`state_dir`: the state directory whose installation record (installation.json) names the
        key that must have signed this log, as the log's own directory does for a SQLite log."""
        from aidc.state.postgres import QmarkConnection, connect, display_name, migrate, require_schema

        self.path = display_name(dsn)
        self.read_only = read_only
        self.signer = signer
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._lock = threading.Lock()
        try:
            conn = connect(dsn)
            try:
                if read_only:
                    require_schema(conn, SCHEMA_VERSION, "the audit log")
                    conn.execute("SET default_transaction_read_only = on")
                else:
                    migrate(conn)
            except BaseException:
                conn.close()
                raise
        except StateError as exc:
            raise AuditError(f"{self.path}: {exc}") from None
        self._conn = conn
        self._db = QmarkConnection(conn)
        if not read_only:
            self._write_genesis_anchor()

    # --- where the anchor lives: a row -----------------------------------------------------------
    def _anchor_missing(self) -> str:
        return f"{self.path}: the audit_anchor row is missing"

    def _installed_public_key(self) -> str | None:
        if self.state_dir is None:
            return None
        from aidc.installation import load

        found = load(self.state_dir)
        return found.public_key_pem if found is not None else None

    def _signed_head(self, seq: int, digest: str) -> str | None:
        if self.signer is None:
            return None
        return json.dumps(self._anchor_signature(seq, digest))

    def _set_anchor(self, seq: int, digest: str) -> None:
        """Move the head (inside the caller's transaction, which holds APPEND_LOCK)."""
        self._conn.execute(
            "INSERT INTO audit_anchor(id, seq, hash, signature) VALUES (1, %s, %s, %s) ON CONFLICT (id) DO UPDATE "
            "SET seq = excluded.seq, hash = excluded.hash, signature = excluded.signature",
            (seq, digest, self._signed_head(seq, digest)))

    def _write_genesis_anchor(self, force: bool = False) -> None:
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
            present = self._conn.execute("SELECT 1 FROM audit_anchor").fetchone()
            empty = self._conn.execute("SELECT 1 FROM audit LIMIT 1").fetchone() is None
            if (force or not present) and empty:
                self._set_anchor(0, GENESIS)

    def _write_anchor(self, seq: int, digest: str, force: bool = False) -> None:
        # Only use_signer() and close() come here: appends move the head in their own transaction.
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
            current = self._conn.execute("SELECT seq FROM audit_anchor").fetchone()
            if force or (current is not None and current[0] < seq):
                self._set_anchor(seq, digest)

    def _read_anchor(self) -> Anchor | None:
        with self._lock:
            row = self._conn.execute("SELECT seq, hash, signature FROM audit_anchor WHERE id = 1").fetchone()
        if row is None:
            return None
        seq, digest, signature = row
        if signature is None:
            return Anchor(seq, digest)
        try:
            data = json.loads(signature)
        except ValueError:
            data = None
        if not (isinstance(data, dict) and isinstance(data.get("value"), str)):
            raise BadAnchor(f"{self.path}: the audit_anchor row has a signature that is not a signature")
        return Anchor(seq, digest, data)

    def _cut_tail_refusal(self, count: int) -> str:
        return (f"{self.path} holds {count} audit records but its audit_anchor row is missing: the tail may have "
                "been cut. Nothing was written; a person must re-anchor it (`aidc audit reanchor --state postgres:DSN "
                "--reason ...`), which records the gap")

    def _keyless_writer_refusal(self) -> str:
        return (f"{self.path}: the audit log is signed (its head carries a signature) but this writer has no "
                "signing key; nothing was written")

    # --- appending ---------------------------------------------------------------------------------
    def _append(self, kind: str, reason: str, actor: str, node: str | None, payload_json: str,
                force_anchor: bool = False) -> AuditRecord:
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
            if not force_anchor:
                # Checked again under the lock: another process may have changed the head since.
                anchor = self._conn.execute("SELECT seq FROM audit_anchor").fetchone()
                row = self._conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                if anchor is None and row is not None:
                    raise AuditError(f"{self.path}: the audit_anchor row is missing; nothing was written")
            else:
                row = self._conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            ts = time.time()
            digest = record_hash(prev, seq, ts, actor, node, kind, reason, payload_json)
            self._conn.execute(f"INSERT INTO audit({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})",
                               (seq, ts, actor, node, kind, reason, payload_json, prev, digest))
            if self.signer is not None:
                self._conn.execute(
                    "INSERT INTO audit_signature(seq, key_id, key_version, signature, algorithm) "
                    "VALUES (%s, %s, %s, %s, %s)", (seq, *self._record_signature(seq, digest)))
            self._set_anchor(seq, digest)
        return AuditRecord(seq, ts, actor, node, kind, reason, json.loads(payload_json), prev, digest)

    # --- reading ---------------------------------------------------------------------------------------
    def _stored_rows(self) -> list[tuple]:
        # seq is the primary key: there is no other physical order to be fooled by.
        with self._lock:
            return self._conn.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY seq").fetchall()

    def _signatures(self) -> dict[int, tuple[str, str | None]]:
        with self._lock:
            return {seq: (value, algorithm) for seq, value, algorithm in
                    self._conn.execute("SELECT seq, signature, algorithm FROM audit_signature").fetchall()}

    def find(self, kind: str, **payload) -> list[AuditRecord]:
        sql, args = f"SELECT {', '.join(COLUMNS)} FROM audit WHERE kind = %s", [kind]
        for key, value in payload.items():
            if not key.isidentifier():
                raise ValueError(f"payload key {key!r} is not a plain name")
            sql += " AND aidc_payload_field(payload, %s) = %s::jsonb"
            args += [key, strict_json.dumps(value)]
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        return [AuditRecord(seq, ts, actor, nd, kd, reason, json.loads(data), prev, digest)
                for seq, ts, actor, nd, kd, reason, data, prev, digest in rows]

    def close(self) -> None:
        self._conn.close()  # the head moved with every append: nothing to catch up
