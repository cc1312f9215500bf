"""The one interface every key provider implements, and its errors.

A provider holds two kinds of keys under one key id:

* key-encryption keys (KEKs), AES-256, versioned: `wrap` seals a data key under the current
  version with AES-256-GCM; `unwrap` opens it under the version recorded beside it. `rotate`
  adds a version and makes it current; older versions stay and still unwrap, so nothing sealed
  before a rotation is lost, and `aidc kms rotate --rewrap` moves old data keys forward.
* a signing key: `sign`, `verify` and `public_key_pem`, with `signing_key_version` recorded so
  a signature names the key that made it. The key carries its algorithm (`signing_algorithm`):
  Ed25519 where the provider has it (local, pkcs11), ECDSA P-256 with SHA-256 where it does not
  (AWS KMS offers no Ed25519). Callers record the algorithm beside each signature and verifiers
  check it against the public key's type (`verify_with_pem(..., algorithm=...)`); a signature
  recorded with no algorithm is an Ed25519 one, as every signature was before keys named theirs.

The caller's associated data is bound into every wrap: a wrapped key only unwraps for the
same purpose (checkpoints bind job and step), the same key id and the same version.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aidc.errors import AidcError

DATA_KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce
ED25519 = "Ed25519"
ECDSA_P256_SHA256 = "ECDSA-P256-SHA256"  # DER-encoded (r, s), as X.509 and AWS KMS write it
SIGNATURE_ALGORITHMS = (ED25519, ECDSA_P256_SHA256)
# What a signature recorded without an algorithm was made with: every one before keys named theirs.
LEGACY_SIGNATURE_ALGORITHM = ED25519


class KmsError(AidcError):
    """A key provider is missing, unreadable, misconfigured or refused an operation."""


class KmsUnavailable(KmsError):
    """A provider named in the spec that this build cannot reach."""


class UnwrapError(KmsError):
    """A wrapped key did not open: another key, another version's bytes, or tampered data."""


class MissingKeyVersion(KmsError):
    """The wrapped key names a KEK version the provider does not hold."""


@dataclass(frozen=True)
class WrappedKey:
    key_id: str
    version: int
    blob: bytes  # nonce || ciphertext || tag


def wrap_aad(key_id: str, version: int, aad: bytes) -> bytes:
    """What a KEK wrap authenticates besides the caller's data: which key, which version."""
    return b"aidc-kek-wrap\0" + key_id.encode() + b"\0" + str(version).encode() + b"\0" + aad


class KeyProvider(ABC):
    """One key id in one key store. Implementations: local, pkcs11, aws-kms (aidc.kms.PROVIDERS)."""

    provider: str
    key_id: str
    signing_algorithm: str = ED25519  # one of SIGNATURE_ALGORITHMS

    # -- opening from the spec (how aidc.kms.open_provider / create_provider reach a plugin) --
    @classmethod
    @abstractmethod
    def from_spec(cls, kms, lab_dir=None) -> "KeyProvider":
        """Open the key the spec's `kms:` section names; KmsError now if it cannot be used."""

    @classmethod
    @abstractmethod
    def create_from_spec(cls, kms, lab_dir=None) -> "KeyProvider":
        """Create that key (KEK version 1 and a signing key); refuse if it exists."""

    # -- key-encryption keys ----------------------------------------------------------
    @abstractmethod
    def versions(self) -> list[int]:
        """Every KEK version held, ascending."""

    @abstractmethod
    def current_version(self) -> int:
        """The version new wraps use."""

    @abstractmethod
    def wrap(self, data_key: bytes, aad: bytes) -> WrappedKey:
        """Seal `data_key` under the current KEK version, bound to `aad`."""

    @abstractmethod
    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Open a wrapped key; MissingKeyVersion or UnwrapError when it cannot."""

    @abstractmethod
    def rotate(self) -> int:
        """Add a KEK version, make it current, return it. Old versions still unwrap."""

    def new_data_key(self, aad: bytes) -> tuple[bytes, WrappedKey]:
        """A fresh AES-256 data key and its wrap under the current version, bound to `aad`.
        Providers with a data-key call of their own (AWS KMS GenerateDataKey) override it."""
        data_key = os.urandom(DATA_KEY_BYTES)
        return data_key, self.wrap(data_key, aad)

    # -- signing ------------------------------------------------------------------------
    @property
    @abstractmethod
    def signing_key_version(self) -> int:
        """The version of the signing key `sign` uses (record it beside each signature)."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """A `signing_algorithm` signature of `data` by the current signing key."""

    @abstractmethod
    def public_key_pem(self) -> str:
        """The current signing key's public half (SubjectPublicKeyInfo PEM)."""

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True when `signature` is the current signing key's signature of `data`."""
        return verify_with_pem(self.public_key_pem(), data, signature, self.signing_algorithm)

    def status(self) -> dict:
        return {"provider": self.provider, "key_id": self.key_id, "kek_versions": self.versions(),
                "current_version": self.current_version(), "kek_algorithm": "AES-256-GCM",
                "signing_algorithm": self.signing_algorithm, "signing_key_version": self.signing_key_version}

    def close(self) -> None:
        """Release sessions or handles (nothing for most providers)."""


@functools.lru_cache(maxsize=16)
def _public_key(public_pem: str) -> tuple[object, str]:
    # Parsed once per PEM: verifying a signed audit log checks one signature per record.
    try:
        key = serialization.load_pem_public_key(public_pem.encode())
    except ValueError as exc:
        raise KmsError(f"not a public key PEM: {exc}") from None
    if isinstance(key, Ed25519PublicKey):
        return key, ED25519
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, ECDSA_P256_SHA256
    raise KmsError(f"expected an Ed25519 or ECDSA P-256 public key, got {type(key).__name__}"
                   + (f" on {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else ""))


def public_key_algorithm(public_pem: str) -> str:
    """The signature algorithm a public key PEM verifies (KmsError when it is none aidc signs with)."""
    return _public_key(public_pem)[1]


def verify_with_pem(public_pem: str, data: bytes, signature: bytes, algorithm: str | None = None) -> bool:
    """Verify a signature with a public key PEM alone: no provider (or PIN) needed.

    `algorithm` is the one recorded beside the signature (None: a record from before
    algorithms were recorded, i.e. Ed25519). A signature whose recorded algorithm is not the
    key's does not verify: the record and the key must agree, so neither can be swapped alone."""
    key, key_algorithm = _public_key(public_pem)
    if (algorithm or LEGACY_SIGNATURE_ALGORITHM) != key_algorithm:
        return False
    try:
        if key_algorithm == ED25519:
            key.verify(signature, data)
        else:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
