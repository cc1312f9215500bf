-- The audit log (aidc.audit.log) on PostgreSQL: the same hash chain and record signatures as the
-- SQLite log, and the anchor as a row instead of a file beside the database. Applied once by
-- aidc.state.postgres.migrate; never edited after release.
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    node TEXT,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL,         -- the exact JSON text the record's hash covers
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
-- A payload's top-level field, NULL where the payload is not JSON PostgreSQL reads (a log
-- written by older code may hold Python's NaN): find(kind, run_id=...) runs on every resumed
-- runbook run, so it has an index; an index, not part of the chain.
CREATE FUNCTION aidc_payload_field(payload TEXT, field TEXT) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN payload::jsonb -> field;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
CREATE INDEX audit_kind_run ON audit(kind, aidc_payload_field(payload, 'run_id'));
CREATE INDEX audit_kind_node ON audit(kind, node, seq);
CREATE TABLE audit_signature (
    seq BIGINT PRIMARY KEY,
    key_id TEXT NOT NULL,
    key_version INTEGER NOT NULL,
    signature TEXT NOT NULL
);
-- The head: the newest record's number and hash (0 and 64 zeros before the first record),
-- signed under the anchor domain when the log is signed. One row; it moves in the transaction
-- that appends a record, so it never lags the chain.
CREATE TABLE audit_anchor (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT                 -- JSON {"key_id", "key_version", "value"}, as in the anchor file
);
-- Records are appended, never changed: an UPDATE or DELETE by aidc's role is an error. (The
-- table owner can disable this; the chain, the anchor and the signatures are what detect it.)
CREATE FUNCTION aidc_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only (% on %)', TG_OP, TG_TABLE_NAME;
END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION aidc_audit_append_only();
CREATE TRIGGER audit_signature_append_only BEFORE UPDATE OR DELETE ON audit_signature
    FOR EACH ROW EXECUTE FUNCTION aidc_audit_append_only();
