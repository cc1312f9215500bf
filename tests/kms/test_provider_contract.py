"""The contract every key provider keeps: local (a keyring), pkcs11 (SoftHSM2) and aws-kms
(moto's KMS server over HTTP). The same tests run against each; what only one provider does
(file modes, PINs, ARNs) is tested beside it."""

from __future__ import annotations

import base64
import uuid

import pytest

from aidc.kms import (ECDSA_P256_SHA256, ED25519, MissingKeyVersion, UnwrapError, WrappedKey, create_provider,
                      open_provider, public_key_algorithm, verify_with_pem)
from aidc.spec import Kms, Pkcs11

DATA_KEY = bytes(range(32))
PROVIDERS = ["local", "pkcs11", "aws-kms"]
EXPECTED_ALGORITHM = {"local": ED25519, "pkcs11": ED25519, "aws-kms": ECDSA_P256_SHA256}


def _spec(name: str, request, tmp_path) -> Kms:
    key = f"k-{uuid.uuid4().hex[:8]}"  # one key per test on the session's token or KMS
    if name == "local":
        return Kms(provider="local", key_id=key, keyring=str(tmp_path / "keyring"))
    if name == "pkcs11":
        softhsm = request.getfixturevalue("softhsm")
        request.getfixturevalue("monkeypatch").setenv("AIDC_TEST_PIN", softhsm["pin"])
        return Kms(provider="pkcs11", key_id=key, pkcs11=Pkcs11(module=softhsm["module"], token_label=softhsm["label"],
                                                               pin_env="AIDC_TEST_PIN"))
    request.getfixturevalue("moto_kms")
    return Kms(provider="aws-kms", key_id=f"alias/{key}")


@pytest.fixture(params=PROVIDERS)
def made(request, tmp_path):
    """(spec, provider) for a key just created through the spec, as `aidc kms init` does."""
    kms = _spec(request.param, request, tmp_path)
    provider = create_provider(kms)
    yield kms, provider
    provider.close()


def test_a_wrapped_key_unwraps_only_with_the_same_associated_data(made):
    _, key = made
    wrapped = key.wrap(DATA_KEY, b"job=a step=1")
    assert (wrapped.key_id, wrapped.version) == (key.key_id, 1) and DATA_KEY not in wrapped.blob
    assert key.unwrap(wrapped, b"job=a step=1") == DATA_KEY
    with pytest.raises(UnwrapError, match="does not unwrap"):
        key.unwrap(wrapped, b"job=a step=2")
    assert key.wrap(DATA_KEY, b"x").blob != key.wrap(DATA_KEY, b"x").blob  # fresh randomness each wrap


def test_a_new_data_key_is_random_and_unwraps_to_itself(made):
    _, key = made
    first, wrapped = key.new_data_key(b"job=a step=3")
    second, _ = key.new_data_key(b"job=a step=3")
    assert len(first) == 32 and first != second and first not in wrapped.blob
    assert key.unwrap(wrapped, b"job=a step=3") == first


def test_rotation_adds_a_version_that_other_handles_see_and_old_versions_still_unwrap(made):
    kms, key = made
    old = key.wrap(DATA_KEY, b"aad")
    assert key.rotate() == 2
    assert key.versions() == [1, 2] and key.current_version() == 2
    assert key.wrap(DATA_KEY, b"aad").version == 2
    again = open_provider(kms)  # another handle (another process would do the same)
    try:
        assert again.current_version() == 2 and again.unwrap(old, b"aad") == DATA_KEY
    finally:
        again.close()


def test_a_version_the_provider_does_not_hold_is_named(made):
    _, key = made
    wrapped = key.wrap(DATA_KEY, b"aad")
    with pytest.raises(MissingKeyVersion, match="version 5 is not"):
        key.unwrap(WrappedKey(wrapped.key_id, 5, wrapped.blob), b"aad")


def test_another_key_cannot_unwrap(made, request, tmp_path):
    kms, key = made
    other_spec = _spec(kms.provider, request, tmp_path / "other")
    other = create_provider(other_spec)
    try:
        wrapped = key.wrap(DATA_KEY, b"aad")
        with pytest.raises(UnwrapError):
            other.unwrap(wrapped, b"aad")  # names another key id
        with pytest.raises(UnwrapError):  # same id in the header, another key's bytes
            other.unwrap(WrappedKey(other.key_id, 1, wrapped.blob), b"aad")
    finally:
        other.close()


def test_signatures_carry_their_algorithm_and_verify_with_the_public_key_alone(made):
    kms, key = made
    algorithm = EXPECTED_ALGORITHM[kms.provider]
    signature = key.sign(b"certificate body")
    pem = key.public_key_pem()
    assert key.signing_algorithm == algorithm and public_key_algorithm(pem) == algorithm
    assert key.verify(b"certificate body", signature) and not key.verify(b"certificate body!", signature)
    assert verify_with_pem(pem, b"certificate body", signature, algorithm)
    assert not verify_with_pem(pem, b"certificate body", bytes(len(signature)), algorithm)
    wrong = ECDSA_P256_SHA256 if algorithm == ED25519 else ED25519
    assert not verify_with_pem(pem, b"certificate body", signature, wrong)  # the record and the key must agree


def test_status_names_provider_versions_and_algorithms(made):
    kms, key = made
    status = key.status()
    assert {k: status[k] for k in ("provider", "key_id", "kek_versions", "current_version", "signing_algorithm",
                                   "signing_key_version")} == {
        "provider": kms.provider, "key_id": kms.key_id, "kek_versions": [1], "current_version": 1,
        "signing_algorithm": EXPECTED_ALGORITHM[kms.provider], "signing_key_version": 1}


def test_create_never_replaces_a_key(made):
    from aidc.kms import KmsError

    kms, _ = made
    with pytest.raises(KmsError, match="already"):
        create_provider(kms)


def test_a_signed_audit_log_and_a_burnin_certificate_verify_with_the_public_key(made, tmp_path):
    from aidc.audit import AuditLog
    from aidc.burnin.certificate import RECORD_KIND, export_certificate, verify_certificate

    kms, key = made
    db = tmp_path / "audit.db"
    with AuditLog(db, signer=key) as log:
        log.append(RECORD_KIND, "burn-in passed", actor="test", node="n1", payload={"verdict": "pass"})
        log.append("node.drain", "xid 79", actor="test", node="n1")
        certificate = export_certificate(log, "n1", key)
    pem = key.public_key_pem()
    assert certificate["signature"]["algorithm"] == EXPECTED_ALGORITHM[kms.provider]
    with AuditLog(db, read_only=True) as log:
        result = log.verify(public_key_pem=pem)
        assert result.ok and result.signed, result.failure
    import json

    text = json.dumps(certificate)
    assert verify_certificate(text, pem)[0]
    forged = {**certificate, "verdict": "fail"}
    assert not verify_certificate(json.dumps(forged), pem)[0]
    relabelled = {**certificate, "signature": {**certificate["signature"], "algorithm": "Ed25519-or-anything"}}
    assert not verify_certificate(json.dumps(relabelled), pem)[0]


def test_checkpoints_encrypted_under_the_key_load_after_rotation(made, tmp_path):
    torch = pytest.importorskip("torch")
    from aidc.checkpoint import load, read_header, rewrap, save

    kms, key = made
    path = tmp_path / "step-3.ckpt"
    state = {"w": torch.arange(5000)}
    save(path, state, job="j", step=3, kms=key, chunk_size=4096)  # several chunks: the parallel load path
    assert read_header(path).to_dict()["provider"] == kms.provider
    key.rotate()
    assert rewrap(path, key) == (1, 2)
    assert torch.equal(load(path, job="j", kms=key)["w"], state["w"])


def test_an_audit_log_signed_before_algorithms_were_recorded_still_verifies(tmp_path):
    """Logs written before keys named their algorithm hold Ed25519 signatures with none beside
    them (no column, no anchor field): they verify as Ed25519, and only with the right key."""
    import json
    import sqlite3

    from aidc.audit import AuditLog
    from aidc.kms.local import LocalKeyring

    key = LocalKeyring.create(tmp_path / "keyring", "old")
    db = tmp_path / "audit.db"
    with AuditLog(db, signer=key) as log:
        for i in range(3):
            log.append("node.drain", f"drain {i}", actor="test", node="n1")
    with sqlite3.connect(db) as raw:  # the table as older code made it
        raw.execute("CREATE TABLE old_sig AS SELECT seq, key_id, key_version, signature FROM audit_signature")
        raw.execute("DROP TABLE audit_signature")
        raw.execute("ALTER TABLE old_sig RENAME TO audit_signature")
    anchor_path = db.with_name("audit.db.anchor")
    anchor = json.loads(anchor_path.read_text())
    del anchor["signature"]["algorithm"]
    anchor_path.write_text(json.dumps(anchor))
    with AuditLog(db, read_only=True) as log:
        result = log.verify(public_key_pem=key.public_key_pem())
        assert result.ok and result.signed, result.failure
        other = LocalKeyring.create(tmp_path / "other", "old")
        assert not log.verify(public_key_pem=other.public_key_pem()).ok
