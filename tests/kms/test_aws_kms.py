"""The aws-kms provider where it differs from the others (the shared contract is in
test_provider_contract.py), and the reference stack that names it, against moto's KMS server."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from aidc.errors import SpecError
from aidc.kms import ECDSA_P256_SHA256, KmsError, missing_library, open_provider, unavailable_reason
from aidc.spec import Kms, parse_spec

LAB = {"name": "x", "node_pools": [{"name": "gpu", "count": 2, "gpu_model": "SIM", "gpus_per_node": 2}]}


@pytest.mark.slow
def test_the_h100_reference_stack_checks_and_its_key_works_against_kms(moto_kms, aidc_cli):
    """As an operator on AWS would: check the stack, create its keys, read the status and the
    public key, all through the CLI, the endpoint coming from AWS_ENDPOINT_URL alone."""
    check = aidc_cli("spec", "check", "--stack", "h100-example", "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["warnings"] == []
    missing = aidc_cli("kms", "status", "--stack", "h100-example")  # only this test makes the stack's keys
    assert missing.returncode != 0
    assert "KMS has no key 'arn:aws:kms:us-east-1:111122223333:alias/aidc-h100-example'" in missing.stderr
    made = aidc_cli("kms", "init", "--stack", "h100-example", "--json")
    assert made.returncode == 0, made.stderr
    status = aidc_cli("kms", "status", "--stack", "h100-example", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert (data["provider"], data["region"], data["signing_algorithm"]) == ("aws-kms", "us-east-1", ECDSA_P256_SHA256)
    assert data["signing_key_id"] == "arn:aws:kms:us-east-1:111122223333:alias/aidc-h100-example-signing"
    public = json.loads(aidc_cli("kms", "public-key", "--stack", "h100-example", "--json").stdout)
    assert public["algorithm"] == ECDSA_P256_SHA256 and public["pem"].startswith("-----BEGIN PUBLIC KEY-----")


def test_spec_check_refuses_a_provider_this_build_lacks(tmp_path, aidc_cli):
    import yaml

    stack = tmp_path / "Pulumi.vault.yaml"
    stack.write_text(yaml.safe_dump({"config": {"aidc:cluster": {**LAB, "kms": {"provider": "vault-transit"}}}}))
    result = aidc_cli("spec", "check", "--stack", str(stack))
    assert result.returncode == 2
    assert "kms.provider: a provider this build can use: kms provider 'vault-transit' is not available" in result.stderr
    assert unavailable_reason("aws-kms") is None and unavailable_reason("local") is None


def test_a_provider_library_that_is_not_installed_is_named_with_its_install(monkeypatch):
    from aidc import kms

    monkeypatch.setitem(kms.PROVIDERS, "aws-kms", kms.PROVIDERS["aws-kms"].__class__(
        "aws", "AwsKmsProvider", "aidc_no_such_library", "pip install it"))
    assert missing_library("aws-kms") == ("kms provider 'aws-kms' needs aidc_no_such_library, which is not "
                                          "installed here (pip install it)")
    assert missing_library("local") is None


def test_a_key_arn_needs_a_named_signing_key_and_the_region_comes_from_it():
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with pytest.raises(SpecError, match="needs aws.signing_key_id"):
        parse_spec({**LAB, "kms": {"provider": "aws-kms", "key_id": arn}})
    spec = parse_spec({**LAB, "kms": {"provider": "aws-kms", "key_id": arn,
                                      "aws": {"signing_key_id": "alias/aidc-signing"}}})
    from aidc.kms.aws import region_of, signing_key_of

    assert (region_of(spec.kms), signing_key_of(spec.kms)) == ("eu-west-1", "alias/aidc-signing")
    assert signing_key_of(Kms(provider="aws-kms", key_id="alias/k")) == "alias/k-signing"


def test_unknown_keys_and_an_unreachable_endpoint_are_clear_errors(moto_kms, monkeypatch):
    with pytest.raises(KmsError, match=r"KMS has no key 'alias/never-made-.*' in us-east-1 .*aidc kms init"):
        open_provider(Kms(provider="aws-kms", key_id=f"alias/never-made-{uuid.uuid4().hex[:6]}"))
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    with pytest.raises(KmsError, match="KMS describe_key could not be sent"):
        open_provider(Kms(provider="aws-kms", key_id="alias/any"))


def test_init_creates_keys_only_under_aliases(moto_kms):
    from aidc.kms import create_provider

    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with pytest.raises(KmsError, match="creates keys under aliases"):
        create_provider(Kms(provider="aws-kms", key_id=arn, aws={"signing_key_id": "alias/s"}))
    assert os.environ["AWS_ENDPOINT_URL"] == moto_kms["endpoint"]


def test_a_trainer_opens_the_key_from_the_mounted_key_reference(moto_kms, tmp_path):
    """The aidc-kms ConfigMap's data (infra/aidc_infra/kms.py key_reference; the round trip is
    tested in tests/infra), mounted as Kubernetes mounts it (one file per key, `..data` links),
    opens the key without the stack file."""
    from aidc.kms import create_provider, open_from_reference

    alias = f"arn:aws:kms:us-east-1:111122223333:alias/ref-{uuid.uuid4().hex[:6]}"
    create_provider(Kms(provider="aws-kms", key_id=alias)).close()
    reference = {"provider": "aws-kms", "key_id": alias, "rotation_days": "90", "aws_region": "us-east-1",
                 "envelope": "AES-256-GCM data key per checkpoint (aidc.checkpoint format 1), wrapped by key_id"}
    mount = tmp_path / "aidc-kms"
    (mount / "..2026_12_07").mkdir(parents=True)
    for name, value in reference.items():
        (mount / "..2026_12_07" / name).write_text(value)
        (mount / name).symlink_to(f"..data/{name}")
    (mount / "..data").symlink_to("..2026_12_07")
    provider = open_from_reference(mount)
    try:
        data_key, wrapped = provider.new_data_key(b"job=j step=1")
        assert provider.unwrap(wrapped, b"job=j step=1") == data_key
        assert (provider.key_id, provider.status()["region"]) == (alias, "us-east-1")
    finally:
        provider.close()
    (mount / "..2026_12_07" / "rotation_days").write_text("ninety")
    with pytest.raises(KmsError, match="rotation_days is not a number"):
        open_from_reference(mount)
