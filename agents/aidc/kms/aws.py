"""The aws-kms provider: keys that never leave AWS KMS (boto3; moto's server in tests).

Two KMS keys serve one aidc key id:

    key_id                  a symmetric key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT): the KEK. KMS keeps
                            every generation of its key material; aidc's KEK version N is the key
                            after N-1 rotations (ListKeyRotations), and Decrypt picks the material
                            a wrapped key names, so old versions keep unwrapping.
    aws.signing_key_id      an ECC_NIST_P256 SIGN_VERIFY key (AWS KMS has no Ed25519): signatures
                            are ECDSA with SHA-256 (DER), verifiable with the public key alone.
                            Default: the KEK's alias with "-signing" appended.

Data keys come from GenerateDataKey and are opened with Decrypt; the caller's associated data
and the KEK version travel in the encryption context, which KMS binds to the ciphertext. The
endpoint, region and credentials are boto3's own (AWS_ENDPOINT_URL, AWS_REGION, instance or
IRSA roles); the region defaults to the one in the key's ARN. Signing sends messages up to
4 KiB as they are (MessageType RAW) and longer ones as their SHA-256 digest (DIGEST), as KMS
documents; moto implements only RAW, so the DIGEST path is not exercised by the tests.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aidc.kms.base import (DATA_KEY_BYTES, ECDSA_P256_SHA256, KeyProvider, KmsError, KmsUnavailable,
                           MissingKeyVersion, UnwrapError, WrappedKey)
from aidc.spec import Kms

_ARN = re.compile(r"^arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}):(?P<resource>(key|alias)/.+)$")
KMS_SIGNING_ALGORITHM = "ECDSA_SHA_256"
RAW_MESSAGE_LIMIT = 4096  # KMS Sign takes at most 4 KiB of raw message; longer ones go as their digest
# KMS answers these when a ciphertext does not open under this key and context.
_NOT_OPENED = {"InvalidCiphertextException", "IncorrectKeyException"}


class KeyNotFound(KmsError):
    """KMS holds no key (or alias) of that id in that region and account."""


def _is_alias(key_id: str) -> bool:
    m = _ARN.match(key_id)
    return (m.group("resource") if m else key_id).startswith("alias/")


def _alias_name(key_id: str) -> str:
    """`alias/x` from `alias/x` or an alias ARN (CreateAlias takes the name)."""
    m = _ARN.match(key_id)
    return m.group("resource") if m else key_id


def signing_key_of(kms: Kms) -> str | None:
    """The signing key's id: the spec's aws.signing_key_id, else the KEK alias + "-signing"."""
    if kms.aws is not None and kms.aws.signing_key_id:
        return kms.aws.signing_key_id
    return f"{kms.key_id}-signing" if _is_alias(kms.key_id) else None


def region_of(kms: Kms) -> str | None:
    """The spec's aws.region, else the region in the key's ARN, else boto3's environment."""
    if kms.aws is not None and kms.aws.region:
        return kms.aws.region
    m = _ARN.match(kms.key_id)
    return m.group("region") if m else (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))


def _context(aad: bytes, version: int) -> dict[str, str]:
    # Encryption-context values are strings: the associated data goes base64-encoded.
    return {"aidc:aad": base64.b64encode(aad).decode(), "aidc:kek-version": str(version)}


class AwsKmsProvider(KeyProvider):
    provider = "aws-kms"
    signing_algorithm = ECDSA_P256_SHA256

    def __init__(self, kms: Kms, _create: bool = False):
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise KmsUnavailable("kms provider 'aws-kms' needs boto3 (pip install 'aidc[aws]')") from None
        self._errors = botocore.exceptions
        self.key_id = kms.key_id
        self.signing_key_id = signing_key_of(kms)
        if self.signing_key_id is None:
            raise KmsError(f"kms key {kms.key_id!r} is not an alias: name the signing key in kms.aws.signing_key_id")
        self.region = region_of(kms)
        if not self.region:
            raise KmsError("no AWS region for kms provider 'aws-kms': set kms.aws.region, use a key ARN, "
                           "or set AWS_REGION")
        # Bounded: a KMS that does not answer is an error in seconds, not a hung checkpoint.
        config = botocore.config.Config(connect_timeout=5, read_timeout=15,
                                        retries={"max_attempts": 3, "mode": "standard"})
        self._client = boto3.client("kms", region_name=self.region, config=config)
        self._public_pem: str | None = None
        self._kek_arn = ""  # the KEK's key ARN: rotation calls take no alias
        if not _create:
            self._kek_arn = self._check_key(self.key_id, "ENCRYPT_DECRYPT")["Arn"]
            self._check_key(self.signing_key_id, "SIGN_VERIFY")

    def _call(self, operation: str, **kwargs) -> dict:
        """One KMS call; every failure becomes a KmsError naming the call and the key."""
        try:
            return getattr(self._client, operation)(**kwargs)
        except self._errors.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            message = exc.response.get("Error", {}).get("Message", "") or code
            key = kwargs.get("KeyId", self.key_id)
            if code in _NOT_OPENED or (operation == "decrypt" and code == "AccessDeniedException"):
                # Real KMS says IncorrectKeyException for another key's ciphertext, moto says
                # AccessDenied; an IAM refusal reads the same, so the message names both.
                raise UnwrapError(f"the data key does not unwrap with KMS key {key!r} ({code}: another key, "
                                  "a tampered or misplaced header, or no kms:Decrypt permission)") from None
            if code == "NotFoundException":
                raise KeyNotFound(f"KMS has no key {key!r} in {self.region} (create it with `aidc kms init` "
                               "or your infrastructure code)") from None
            raise KmsError(f"KMS {operation} on {key!r} failed: {code}: {message}") from None
        except self._errors.NoCredentialsError:
            raise KmsError("no AWS credentials for kms provider 'aws-kms' (an instance or IRSA role, or "
                           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None
        except self._errors.BotoCoreError as exc:  # endpoint unreachable, timeouts, bad endpoint URL
            raise KmsError(f"KMS {operation} could not be sent: {exc}") from None

    def _check_key(self, key_id: str, usage: str) -> dict:
        meta = self._call("describe_key", KeyId=key_id)["KeyMetadata"]
        if meta.get("KeyUsage") != usage:
            raise KmsError(f"KMS key {key_id!r} has usage {meta.get('KeyUsage')}, aidc needs {usage} here")
        if meta.get("KeyState") != "Enabled":
            raise KmsError(f"KMS key {key_id!r} is {meta.get('KeyState')}, not Enabled")
        return meta

    @classmethod
    def from_spec(cls, kms: Kms, lab_dir=None) -> "AwsKmsProvider":
        return cls(kms)

    @classmethod
    def create_from_spec(cls, kms: Kms, lab_dir=None) -> "AwsKmsProvider":
        return cls.create(kms)

    @classmethod
    def create(cls, kms: Kms) -> "AwsKmsProvider":
        """Create the KEK and the signing key under their aliases; refuse if either alias exists.
        A key named by a key ARN or id is made by the infrastructure code, not here."""
        self = cls(kms, _create=True)
        for key_id in (self.key_id, self.signing_key_id):
            if not _is_alias(key_id):
                raise KmsError(f"`aidc kms init` creates keys under aliases; {key_id!r} names an existing key "
                               "(create it with your infrastructure code, then `aidc kms status`)")
            try:
                self._call("describe_key", KeyId=key_id)
            except KeyNotFound:
                pass
            else:
                raise KmsError(f"KMS already holds key {key_id!r}")
        kek = self._call("create_key", KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT",
                         Description=f"aidc key-encryption key {self.key_id}")["KeyMetadata"]
        self._call("create_alias", AliasName=_alias_name(self.key_id), TargetKeyId=kek["KeyId"])
        self._kek_arn = kek["Arn"]
        signing = self._call("create_key", KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY",
                             Description=f"aidc signing key {self.signing_key_id}")["KeyMetadata"]
        self._call("create_alias", AliasName=_alias_name(self.signing_key_id), TargetKeyId=signing["KeyId"])
        return self

    # -- key-encryption key ---------------------------------------------------------------
    def versions(self) -> list[int]:
        rotations, marker = 0, None
        for _ in range(1000):  # bounded: 1000 pages of rotations is far past any real key
            page = self._call("list_key_rotations", KeyId=self._kek_arn, **({"Marker": marker} if marker else {}))
            rotations += len(page.get("Rotations", []))
            marker = page.get("NextMarker") if page.get("Truncated") else None
            if marker is None:
                break
        return list(range(1, rotations + 2))

    def current_version(self) -> int:
        return self.versions()[-1]

    def wrap(self, data_key: bytes, aad: bytes) -> WrappedKey:
        version = self.current_version()
        blob = self._call("encrypt", KeyId=self._kek_arn, Plaintext=data_key,
                          EncryptionContext=_context(aad, version))["CiphertextBlob"]
        return WrappedKey(self.key_id, version, blob)

    def new_data_key(self, aad: bytes) -> tuple[bytes, WrappedKey]:
        version = self.current_version()
        answer = self._call("generate_data_key", KeyId=self._kek_arn, NumberOfBytes=DATA_KEY_BYTES,
                            EncryptionContext=_context(aad, version))
        return answer["Plaintext"], WrappedKey(self.key_id, version, answer["CiphertextBlob"])

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.key_id != self.key_id:
            raise UnwrapError(f"wrapped under key {wrapped.key_id!r}; this provider holds {self.key_id!r}")
        versions = self.versions()
        if wrapped.version not in versions:
            raise MissingKeyVersion(f"key {self.key_id!r} version {wrapped.version} is not in KMS "
                                    f"(it holds versions {', '.join(map(str, versions))})")
        return self._call("decrypt", KeyId=self._kek_arn, CiphertextBlob=wrapped.blob,
                          EncryptionContext=_context(aad, wrapped.version))["Plaintext"]

    def rotate(self) -> int:
        # On-demand rotation: new key material, the old kept for Decrypt. KMS limits how many
        # on-demand rotations a key may have; its error then reaches the caller as a KmsError.
        self._call("rotate_key_on_demand", KeyId=self._kek_arn)
        return self.current_version()

    # -- signing --------------------------------------------------------------------------
    @property
    def signing_key_version(self) -> int:
        # KMS never rotates asymmetric keys: a new signing key is a new key id (and a new PEM).
        return 1

    def sign(self, data: bytes) -> bytes:
        # Either way the signature is ECDSA-SHA256 over `data`: KMS hashes a RAW message itself,
        # and takes the SHA-256 digest of a longer one (RAW is limited to 4 KiB).
        if len(data) <= RAW_MESSAGE_LIMIT:
            message, kind = data, "RAW"
        else:
            message, kind = hashlib.sha256(data).digest(), "DIGEST"
        return self._call("sign", KeyId=self.signing_key_id, Message=message, MessageType=kind,
                          SigningAlgorithm=KMS_SIGNING_ALGORITHM)["Signature"]

    def public_key_pem(self) -> str:
        if self._public_pem is None:
            der = self._call("get_public_key", KeyId=self.signing_key_id)["PublicKey"]
            key = serialization.load_der_public_key(der)
            if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
                raise KmsError(f"KMS key {self.signing_key_id!r} is not an ECC_NIST_P256 key")
            self._public_pem = key.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return self._public_pem

    def status(self) -> dict:
        return {**super().status(), "kek_algorithm": "AWS KMS SYMMETRIC_DEFAULT", "region": self.region,
                "signing_key_id": self.signing_key_id}

    def close(self) -> None:
        self._client.close()
