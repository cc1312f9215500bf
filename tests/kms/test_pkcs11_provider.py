"""The pkcs11 provider against a real SoftHSM2 token: keys stay on the token."""

from __future__ import annotations

import uuid

import pytest

from aidc.kms import KmsError, MissingKeyVersion, UnwrapError, create_provider, open_provider, verify_with_pem
from aidc.spec import Kms, Pkcs11

DATA_KEY = bytes(range(32))


def _kms(softhsm, key_id: str, **pkcs11) -> Kms:
    settings = {"module": softhsm["module"], "token_label": softhsm["label"], "pin_env": "AIDC_TEST_PIN", **pkcs11}
    return Kms(provider="pkcs11", key_id=key_id, pkcs11=Pkcs11(**settings))


@pytest.fixture
def hsm_key(softhsm, monkeypatch):
    monkeypatch.setenv("AIDC_TEST_PIN", softhsm["pin"])
    kms = _kms(softhsm, f"k-{uuid.uuid4().hex[:8]}")  # one key id per test on the shared token
    provider = create_provider(kms)
    yield kms, provider
    provider.close()


def test_version_not_on_the_token_is_named(hsm_key):
    _, hsm = hsm_key
    wrapped = hsm.wrap(DATA_KEY, b"aad")
    from aidc.kms import WrappedKey

    with pytest.raises(MissingKeyVersion, match="version 5 is not on token 'aidc-test'"):
        hsm.unwrap(WrappedKey(wrapped.key_id, 5, wrapped.blob), b"aad")


def test_private_keys_cannot_be_extracted(hsm_key):
    _, hsm = hsm_key
    import pkcs11

    kek = hsm._kek(1)
    assert kek[pkcs11.Attribute.SENSITIVE] and not kek[pkcs11.Attribute.EXTRACTABLE]
    with pytest.raises(pkcs11.exceptions.PKCS11Error):
        kek[pkcs11.Attribute.VALUE]


def test_a_key_not_on_the_token_is_a_clear_error(softhsm, monkeypatch):
    monkeypatch.setenv("AIDC_TEST_PIN", softhsm["pin"])
    with pytest.raises(KmsError, match="holds no key 'never-made'.*aidc kms init"):
        open_provider(_kms(softhsm, "never-made"))


def test_absent_token_wrong_pin_and_no_pin_are_clear_errors(softhsm, monkeypatch):
    monkeypatch.setenv("AIDC_TEST_PIN", softhsm["pin"])
    with pytest.raises(KmsError, match="no token labelled 'no-such-token'.*SOFTHSM2_CONF"):
        open_provider(_kms(softhsm, "k", token_label="no-such-token"))
    monkeypatch.setenv("AIDC_TEST_PIN", "000000")
    with pytest.raises(KmsError, match="token 'aidc-test' refused the PIN"):
        open_provider(_kms(softhsm, "k"))
    monkeypatch.delenv("AIDC_TEST_PIN")
    with pytest.raises(KmsError, match=r"no PIN for token 'aidc-test': set \$AIDC_TEST_PIN"):
        open_provider(_kms(softhsm, "k"))


def test_pin_file_must_be_private(softhsm, monkeypatch, tmp_path):
    monkeypatch.delenv("AIDC_TEST_PIN", raising=False)
    pin = tmp_path / "pin"
    pin.write_text(softhsm["pin"] + "\n")
    pin.chmod(0o644)
    with pytest.raises(KmsError, match="PIN file .* accessible to group or others"):
        open_provider(_kms(softhsm, "k", pin_file=str(pin)))
    pin.chmod(0o600)
    with pytest.raises(KmsError, match="holds no key 'k'"):  # the PIN was accepted: the key is what is missing
        open_provider(_kms(softhsm, "k", pin_file=str(pin)))


def test_missing_module_is_a_clear_error(softhsm, monkeypatch):
    monkeypatch.setenv("AIDC_TEST_PIN", softhsm["pin"])
    with pytest.raises(KmsError, match="PKCS#11 module /nonexistent/lib.so does not exist"):
        open_provider(_kms(softhsm, "k", module="/nonexistent/lib.so"))


