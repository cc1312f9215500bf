-- The signing key's algorithm beside each record signature ("Ed25519", "ECDSA-P256-SHA256": see
-- aidc.kms), as the SQLite log keeps it; NULL in rows written before keys named theirs, which
-- are Ed25519. The anchor row's signature JSON carries it too.
ALTER TABLE audit_signature ADD COLUMN algorithm TEXT;
