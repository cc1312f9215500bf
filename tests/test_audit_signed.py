"""The signed audit log: without the private key, no change to the log, its tail or its anchor
passes `verify(public_key_pem=...)`; a writer refuses a log whose anchor was removed."""

import hashlib
import json
import sqlite3

import pytest

from aidc.audit import AuditLog
from aidc.audit import log as audit_log
from aidc.errors import AuditError
from aidc.kms.local import LocalKeyring


@pytest.fixture
def keyring(tmp_path):
    return LocalKeyring.create(tmp_path / "keyring", "audit-test")


@pytest.fixture
def pem(keyring):
    return keyring.public_key_pem()


@pytest.fixture
def log(tmp_path, keyring):
    """Eight records signed by the keyring that the sidecar names (as the lab sets it up)."""
    db = tmp_path / "audit.db"
    audit_log.configure_signing(db, keyring.path, keyring.key_id)
    with AuditLog(db) as writer:
        for i in range(8):
            writer.append("burnin.certificate", f"record {i + 1}", actor="test", node=f"n{i % 2}", payload={"i": i})
    reader = AuditLog(db, read_only=True)
    yield reader
    reader.close()


def _sql(path, statement, *args):
    db = sqlite3.connect(path)
    db.execute(statement, args)
    db.commit()
    db.close()


def _rows(path):
    db = sqlite3.connect(path)
    rows = db.execute("SELECT seq, ts, actor, node, kind, reason, payload FROM audit ORDER BY seq").fetchall()
    db.close()
    return rows


def test_a_genuine_signed_log_verifies_with_its_public_key(log, pem):
    result = log.verify(public_key_pem=pem)
    assert result.ok and result.signed and result.records == 8, result


def test_another_public_key_does_not_verify_the_log(log, tmp_path):
    other = LocalKeyring.create(tmp_path / "other", "other").public_key_pem()
    result = log.verify(public_key_pem=other)
    assert not result.ok and "does not verify with this public key" in result.problem


def test_an_edited_field_is_detected(log, pem):
    _sql(log.path, "UPDATE audit SET reason = 'nothing happened' WHERE seq = 4")
    result = log.verify(public_key_pem=pem)
    assert not result.ok and result.first_bad_seq == 4


def test_an_edited_field_with_the_chain_rehashed_from_there_is_detected(log, pem):
    # The attacker recomputes every hash from the edit on and moves the anchor: the records'
    # signatures and the anchor's signature were over the old hashes.
    _sql(log.path, "UPDATE audit SET reason = 'nothing happened' WHERE seq = 4")
    last = _rehash_everything(log)
    log.anchor_path.write_text(json.dumps({"seq": 8, "hash": last, "signature": json.loads(
        log.anchor_path.read_text())["signature"]}))
    result = log.verify(public_key_pem=pem)
    assert not result.ok and "signature" in result.problem


def test_an_inserted_tail_row_with_a_valid_hash_is_detected(log, pem):
    prev = _rows_hashes(log)[-1]
    payload = json.dumps({"i": 99})
    digest = audit_log.record_hash(prev, 9, 1.0, "attacker", None, "burnin.certificate", "forged", payload)
    _sql(log.path, "INSERT INTO audit VALUES (9, 1.0, 'attacker', NULL, 'burnin.certificate', 'forged', ?, ?, ?)",
         payload, prev, digest)
    assert log.verify().ok  # the hash chain alone cannot tell
    result = log.verify(public_key_pem=pem)
    assert not result.ok and result.first_bad_seq == 9 and "not signed" in result.problem


def test_an_inserted_tail_row_stays_detected_after_the_writer_appends_past_it(log, pem):
    prev = _rows_hashes(log)[-1]
    digest = audit_log.record_hash(prev, 9, 1.0, "attacker", None, "x", "forged", "{}")
    _sql(log.path, "INSERT INTO audit VALUES (9, 1.0, 'attacker', NULL, 'x', 'forged', '{}', ?, ?)", prev, digest)
    with AuditLog(log.path) as writer:
        writer.append("x", "genuine", actor="test")
    result = log.verify(public_key_pem=pem)
    assert not result.ok and result.first_bad_seq == 9


def test_a_deleted_middle_row_is_detected(log, pem):
    _sql(log.path, "DELETE FROM audit WHERE seq = 3")
    result = log.verify(public_key_pem=pem)
    assert not result.ok and result.first_bad_seq == 3


def test_reordered_rows_are_detected(log, pem):
    _sql(log.path, "UPDATE audit SET seq = 100 WHERE seq = 2")
    _sql(log.path, "UPDATE audit SET seq = 2 WHERE seq = 5")
    _sql(log.path, "UPDATE audit SET seq = 5 WHERE seq = 100")
    result = log.verify(public_key_pem=pem)
    assert not result.ok and result.first_bad_seq == 2


def test_a_truncated_tail_is_detected(log, pem):
    _sql(log.path, "DELETE FROM audit WHERE seq > 6")
    result = log.verify(public_key_pem=pem)
    assert not result.ok and "truncated" in result.problem


def test_a_truncated_tail_with_a_rewritten_unsigned_anchor_is_detected(log, pem):
    _sql(log.path, "DELETE FROM audit WHERE seq > 6")
    log.anchor_path.write_text(json.dumps({"seq": 6, "hash": _rows_hashes(log)[-1]}))
    result = log.verify(public_key_pem=pem)
    assert not result.ok and "not signed" in result.problem


def test_a_record_signature_cannot_serve_as_the_anchor_signature(log, pem):
    # Domain separation: record 6's own signature, moved into a forged anchor for record 6.
    _sql(log.path, "DELETE FROM audit WHERE seq > 6")
    db = sqlite3.connect(log.path)
    record_signature = db.execute("SELECT signature FROM audit_signature WHERE seq = 6").fetchone()[0]
    db.close()
    log.anchor_path.write_text(json.dumps({"seq": 6, "hash": _rows_hashes(log)[-1], "signature": {
        "key_id": "audit-test", "key_version": 1, "value": record_signature}}))
    result = log.verify(public_key_pem=pem)
    assert not result.ok and "anchor's signature" in result.problem


def test_truncation_plus_anchor_removal_is_detected_and_the_writer_refuses_to_go_on(log, pem):
    _sql(log.path, "DELETE FROM audit WHERE seq > 6")
    log.anchor_path.unlink()
    result = log.verify(public_key_pem=pem)
    assert not result.ok and "missing" in result.problem
    writer = AuditLog(log.path)
    with pytest.raises(AuditError, match="anchor file .* is missing.*reanchor"):
        writer.append("x", "the attacker lets the writer go on", actor="test")
    writer.close()
    assert len(_rows(log.path)) == 6 and not log.anchor_path.exists()  # nothing was written


def test_a_reanchor_is_an_audited_record_of_the_gap_and_the_log_verifies_after_it(log, pem):
    _sql(log.path, "DELETE FROM audit WHERE seq > 6")
    log.anchor_path.unlink()
    with AuditLog(log.path) as writer:
        record = writer.reanchor("tail lost in the disk failure of 2026-11-30", actor="ops")
        writer.append("x", "after the re-anchor", actor="test")
    assert record.seq == 7 and record.kind == "audit.reanchor"
    assert record.payload["records_found"] == 6 and "missing" in record.payload["problem"]
    assert record.payload["previous_anchor"] is None
    result = log.verify(public_key_pem=pem)
    assert result.ok and result.records == 8, result
    assert any("record 7 re-anchored" in n for n in result.notes)


def test_a_reanchor_after_a_truncation_records_the_anchor_it_replaced(log, pem):
    old_anchor = json.loads(log.anchor_path.read_text())
    _sql(log.path, "DELETE FROM audit WHERE seq > 5")
    with AuditLog(log.path) as writer:
        record = writer.reanchor("rows 6-8 lost in a restore from backup", actor="ops")
    assert record.seq == 6 and "truncated" in record.payload["problem"]
    assert record.payload["previous_anchor"] == {"seq": 8, "hash": old_anchor["hash"]}
    assert log.verify(public_key_pem=pem).ok


def test_a_reanchor_is_refused_for_a_broken_chain_and_for_a_log_that_verifies(log):
    with AuditLog(log.path) as writer:
        with pytest.raises(AuditError, match="nothing to re-anchor"):
            writer.reanchor("why not", actor="ops")
        _sql(log.path, "UPDATE audit SET reason = 'edited' WHERE seq = 2")
        with pytest.raises(AuditError, match="broken at record 2"):
            writer.reanchor("bless the edit", actor="ops")


def test_a_full_rewrite_without_the_key_is_detected(log, pem):
    # Every row re-hashed, the signatures dropped, a matching anchor written: all the attacker
    # can do without the private key.
    last = _rehash_everything(log)
    _sql(log.path, "DELETE FROM audit_signature")
    log.anchor_path.write_text(json.dumps({"seq": 8, "hash": last}))
    assert log.verify().ok  # the unsigned checks are satisfied
    result = log.verify(public_key_pem=pem)
    assert not result.ok and "not signed" in result.problem


def test_a_full_rewrite_keeping_the_old_signatures_is_detected(log, pem):
    anchor = json.loads(log.anchor_path.read_text())
    last = _rehash_everything(log, reason_suffix=" (rewritten)")
    log.anchor_path.write_text(json.dumps({**anchor, "hash": last}))
    result = log.verify(public_key_pem=pem)
    assert not result.ok and "signature" in result.problem


def test_a_writer_without_the_key_refuses_to_append_to_a_signed_log(log):
    audit_log.signing_config_path(log.path).unlink()
    writer = AuditLog(log.path)
    with pytest.raises(AuditError, match="signed .* no signing key"):
        writer.append("x", "unsigned", actor="test")
    writer.close()


def test_records_before_signing_began_are_covered_by_the_signed_anchor(tmp_path, keyring):
    db = tmp_path / "audit.db"
    writer = AuditLog(db)
    writer.append("lab.start", "before the keyring existed", actor="lab")
    writer.use_signer(keyring)
    writer.append("x", "signed", actor="lab")
    writer.close()
    with AuditLog(db, read_only=True) as reader:
        result = reader.verify(public_key_pem=keyring.public_key_pem())
        assert result.ok, result
        assert any("records 1-1 precede" in n for n in result.notes)
        _sql(db, "UPDATE audit SET reason = 'edited' WHERE seq = 1")
        assert not reader.verify(public_key_pem=keyring.public_key_pem()).ok


def test_an_empty_signed_log_has_a_signed_genesis_anchor(tmp_path, keyring):
    db = tmp_path / "audit.db"
    AuditLog(db, signer=keyring).close()
    with AuditLog(db, read_only=True) as reader:
        assert reader.verify(public_key_pem=keyring.public_key_pem()).ok


def test_cli_verify_with_the_public_key_exits_0_then_1_after_tampering(log, keyring, tmp_path, aidc_cli):
    key_file = tmp_path / "signing.pem"
    key_file.write_text(keyring.public_key_pem())
    ok = aidc_cli("audit", "verify", "--db", str(log.path), "--public-key", str(key_file))
    assert ok.returncode == 0 and "signed" in ok.stdout, ok.stdout + ok.stderr
    _sql(log.path, "DELETE FROM audit WHERE seq > 6")
    log.anchor_path.unlink()
    bad = aidc_cli("audit", "verify", "--db", str(log.path), "--public-key", str(key_file))
    assert bad.returncode == 1 and "anchor file" in bad.stdout and "missing" in bad.stdout
    fixed = aidc_cli("audit", "reanchor", "--db", str(log.path), "--reason", "tail lost, see ticket 42")
    assert fixed.returncode == 0 and "re-anchored at record 7" in fixed.stdout, fixed.stderr
    again = aidc_cli("audit", "verify", "--db", str(log.path), "--public-key", str(key_file))
    assert again.returncode == 0 and "re-anchored the log: tail lost, see ticket 42" in again.stdout


def test_cli_verify_refuses_a_foreign_sqlite_file_and_leaves_it_unchanged(tmp_path, keyring, aidc_cli):
    foreign = tmp_path / "app.db"
    _sql(foreign, "CREATE TABLE users (id INTEGER, name TEXT)")
    key_file = tmp_path / "signing.pem"
    key_file.write_text(keyring.public_key_pem())
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    neighbours = sorted(p.name for p in tmp_path.iterdir())
    for args in (["verify", "--public-key", str(key_file)], ["reanchor", "--reason", "x"]):
        out = aidc_cli("audit", *args, "--db", str(foreign))
        assert out.returncode == 1 and "not an aidc audit log" in out.stderr and "Traceback" not in out.stderr
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == neighbours


def _rows_hashes(log):
    db = sqlite3.connect(log.path)
    hashes = [r[0] for r in db.execute("SELECT hash FROM audit ORDER BY seq")]
    db.close()
    return hashes


def _rehash_everything(log, reason_suffix=""):
    """Rewrite every row's hash (and optionally its reason) as a valid chain; the last hash."""
    db = sqlite3.connect(log.path)
    prev = audit_log.GENESIS
    for seq, ts, actor, node, kind, reason, payload in _rows(log.path):
        reason += reason_suffix
        digest = audit_log.record_hash(prev, seq, ts, actor, node, kind, reason, payload)
        db.execute("UPDATE audit SET reason = ?, prev_hash = ?, hash = ? WHERE seq = ?", (reason, prev, digest, seq))
        prev = digest
    db.commit()
    db.close()
    return prev
