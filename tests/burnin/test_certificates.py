"""Burn-in certificates: exported from a signed audit log, they verify offline with the public
key alone; any change to the document, or another key, makes verification fail with a reason."""

import json
import sqlite3

import pytest

from aidc.audit import AuditLog
from aidc.audit import log as audit_log
from aidc.burnin.certificate import export_certificate, verify_certificate
from aidc.errors import AuditError
from aidc.kms.local import LocalKeyring


@pytest.fixture
def keyring(tmp_path):
    return LocalKeyring.create(tmp_path / "keyring", "burnin-test")


@pytest.fixture
def db(tmp_path, keyring):
    db = tmp_path / "audit.db"
    audit_log.configure_signing(db, keyring.path, keyring.key_id)
    with AuditLog(db) as log:
        log.append("lab.start", "lab", actor="lab")
        log.append("burnin.certificate", "passed burn-in", actor="burnin", node="n1",
                   payload={"verdict": "pass", "metrics": {"gemm_fp32_tflops": 0.41, "memcpy_gbps": float("nan")}})
        log.append("burnin.certificate", "failed burn-in: GEMM below the floor", actor="burnin", node="n2",
                   payload={"verdict": "fail", "reasons": ["GEMM below the floor"]})
        log.append("burnin.certificate", "passed burn-in", actor="burnin", node="n2", payload={"verdict": "pass"})
    return db


def _export(db, node, keyring):
    with AuditLog(db, read_only=True) as log:
        return export_certificate(log, node, keyring)


def test_an_exported_certificate_verifies_with_the_public_key(db, keyring):
    document = _export(db, "n1", keyring)
    valid, why = verify_certificate(json.dumps(document), keyring.public_key_pem())
    assert valid, why
    assert document["verdict"] == "pass" and document["record"]["seq"] == 2 and "node n1" in why


def test_the_latest_certificate_of_a_node_is_exported(db, keyring):
    document = _export(db, "n2", keyring)
    assert document["record"]["seq"] == 4 and document["verdict"] == "pass"


@pytest.mark.parametrize("change", [
    lambda d: d.update(verdict="fail"),
    lambda d: d.update(node="n9"),
    lambda d: d["record"].update(reason="passed with honours"),
    lambda d: d["record"].update(payload=d["record"]["payload"].replace("0.41", "0.99")),
    lambda d: d["signature"].update(key_version=2),
], ids=["verdict", "node", "record-reason", "record-metric", "key-version"])
def test_a_modified_certificate_fails_with_the_reason(db, keyring, change):
    document = _export(db, "n1", keyring)
    change(document)
    valid, why = verify_certificate(json.dumps(document), keyring.public_key_pem())
    assert not valid and "modified or signed by another key" in why


def test_another_key_does_not_verify_a_certificate(db, keyring, tmp_path):
    document = _export(db, "n1", keyring)
    other = LocalKeyring.create(tmp_path / "other", "other").public_key_pem()
    valid, why = verify_certificate(json.dumps(document), other)
    assert not valid and "another key" in why


def test_no_certificate_is_exported_from_a_log_that_does_not_verify(db, keyring):
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit SET reason = 'passed burn-in' WHERE seq = 3")
    conn.commit()
    conn.close()
    with pytest.raises(AuditError, match="does not verify.*no certificate"):
        _export(db, "n1", keyring)


def test_a_node_without_a_certificate_is_named(db, keyring):
    with pytest.raises(AuditError, match="no burn-in certificate for node 'n7'"):
        _export(db, "n7", keyring)


def test_cli_export_then_verify_exits_0_and_a_tampered_copy_exits_1(db, keyring, tmp_path, aidc_cli):
    cert, key_file = tmp_path / "out" / "n1.cert.json", tmp_path / "signing.pem"
    key_file.write_text(keyring.public_key_pem())
    exported = aidc_cli("burnin", "certificate", "export", "n1", "--db", str(db), "--out", str(cert))
    assert exported.returncode == 0, exported.stderr
    ok = aidc_cli("burnin", "certificate", "verify", str(cert), "--public-key", str(key_file))
    assert ok.returncode == 0 and "valid" in ok.stdout and "node n1: burn-in pass" in ok.stdout
    document = json.loads(cert.read_text())
    document["verdict"] = "fail"
    cert.write_text(json.dumps(document))
    bad = aidc_cli("burnin", "certificate", "verify", str(cert), "--public-key", str(key_file))
    assert bad.returncode == 1 and "INVALID" in bad.stdout and "modified" in bad.stdout
    not_a_cert = aidc_cli("burnin", "certificate", "verify", str(key_file), "--public-key", str(key_file))
    assert not_a_cert.returncode == 1 and "not a certificate" in not_a_cert.stdout
