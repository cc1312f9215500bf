"""The local key provider: a keyring directory with versioned AES-256 KEKs and an Ed25519 signing key."""

from __future__ import annotations

import json
import os
import stat

import pytest

from aidc.kms import KmsError, KmsUnavailable, MissingKeyVersion, UnwrapError, open_provider, verify_with_pem
from aidc.kms.local import LocalKeyring
from aidc.spec import Kms, parse_spec

DATA_KEY = bytes(range(32))


@pytest.fixture
def keyring(tmp_path):
    return LocalKeyring.create(tmp_path / "keyring", "test-key")


def test_keyring_is_private_to_its_owner(keyring):
    assert stat.S_IMODE(keyring.path.stat().st_mode) == 0o700
    files = [p for p in keyring.path.iterdir()]
    assert {p.name for p in files} >= {"keyring.json", "kek-v1.key", "signing-v1.pem"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_a_version_the_keyring_does_not_hold_is_named(keyring, tmp_path):
    keyring.rotate()
    wrapped = keyring.wrap(DATA_KEY, b"aad")
    fresh = LocalKeyring.create(tmp_path / "fresh", "test-key")
    with pytest.raises(MissingKeyVersion, match=r"version 2 is not in keyring .*fresh \(it holds versions 1\)"):
        fresh.unwrap(wrapped, b"aad")


def test_status_names_provider_versions_and_algorithms(keyring):
    keyring.rotate()
    assert keyring.status() == {"provider": "local", "key_id": "test-key", "kek_versions": [1, 2],
                                "current_version": 2, "kek_algorithm": "AES-256-GCM", "signing_algorithm": "Ed25519",
                                "signing_key_version": 1, "keyring": str(keyring.path)}


# -- a missing or unreadable keyring is a clear error when it is opened ------------------
def test_missing_keyring_is_a_clear_error(tmp_path):
    with pytest.raises(KmsError, match=r"no keyring at .*nowhere \(create one with `aidc kms init`\)"):
        LocalKeyring(tmp_path / "nowhere")


def test_group_readable_keyring_or_key_file_is_refused(keyring):
    os.chmod(keyring.path, 0o750)
    with pytest.raises(KmsError, match="accessible to group or others.*must be 0700"):
        LocalKeyring(keyring.path)
    os.chmod(keyring.path, 0o700)
    os.chmod(keyring.path / "signing-v1.pem", 0o644)
    with pytest.raises(KmsError, match="signing-v1.pem is accessible to group or others"):
        LocalKeyring(keyring.path)


def test_garbled_manifest_is_a_clear_error(keyring):
    (keyring.path / "keyring.json").write_text("{not json")
    with pytest.raises(KmsError, match="keyring.json is not a keyring manifest"):
        LocalKeyring(keyring.path)


def test_manifest_naming_a_current_version_it_does_not_list_is_refused(keyring):
    manifest = json.loads((keyring.path / "keyring.json").read_text())
    (keyring.path / "keyring.json").write_text(json.dumps({**manifest, "current": 7}))
    with pytest.raises(KmsError, match="current version 7, which it does not list"):
        LocalKeyring(keyring.path)


def test_missing_key_file_is_named(keyring):
    (keyring.path / "kek-v1.key").unlink()
    with pytest.raises(KmsError, match="key-encryption key version 1 kek-v1.key is missing"):
        keyring.wrap(DATA_KEY, b"aad")


def test_keyring_of_another_key_id_is_refused(keyring):
    with pytest.raises(KmsError, match="holds key 'test-key', but the spec names 'other'"):
        LocalKeyring(keyring.path, "other")


# -- the provider the spec names ---------------------------------------------------------
@pytest.mark.parametrize("provider", ["vault-transit", "gcp-kms", "azure-keyvault"])
def test_cloud_providers_not_built_say_so(provider):
    with pytest.raises(KmsUnavailable,
                       match=f"'{provider}' is not available in this build .available: local, pkcs11, aws-kms"):
        open_provider(Kms(provider=provider, key_id="k"))


def test_spec_local_provider_opens_the_keyring_it_names(keyring):
    opened = open_provider(Kms(provider="local", key_id="test-key", keyring=str(keyring.path)))
    assert opened.unwrap(keyring.wrap(DATA_KEY, b"a"), b"a") == DATA_KEY


LAB = {"name": "x", "node_pools": [{"name": "gpu", "count": 2, "gpu_model": "SIM", "gpus_per_node": 2}]}


def test_spec_pkcs11_needs_its_section_and_never_takes_a_pin():
    from aidc.errors import SpecError

    with pytest.raises(SpecError, match="needs a pkcs11: section"):
        parse_spec({**LAB, "kms": {"provider": "pkcs11"}})
    with pytest.raises(SpecError) as err:
        parse_spec({**LAB, "kms": {"provider": "pkcs11", "pkcs11": {"token_label": "t", "pin": "1234"}}})
    assert "pin" in err.value.key
    ok = parse_spec({**LAB, "kms": {"provider": "pkcs11", "pkcs11": {"token_label": "t", "pin_file": "/etc/aidc/pin"}}})
    assert ok.kms.pkcs11.pin_env == "AIDC_PKCS11_PIN" and ok.kms.pkcs11.pin_file == "/etc/aidc/pin"


def test_spec_key_id_refuses_path_tricks_and_accepts_arns():
    from aidc.errors import SpecError

    with pytest.raises(SpecError):
        parse_spec({**LAB, "kms": {"key_id": "../../etc"}})
    parse_spec({**LAB, "kms": {"provider": "aws-kms", "key_id": "arn:aws:kms:us-east-1:1:key/ab-12",
                               "aws": {"signing_key_id": "arn:aws:kms:us-east-1:1:key/cd-34"}}})
