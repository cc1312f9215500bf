"""The one interface every key provider implements, and its errors.

A provider holds two kinds of keys under one key id:

* key-encryption keys (KEKs), AES-256, versioned: `wrap` seals a data key under the current
  version with AES-256-GCM; `unwrap` opens it under the version recorded beside it. `rotate`
  adds a version and makes it current; older versions stay and still unwrap, so nothing sealed
  before a rotation is lost, and `aidc kms rotate --rewrap` moves old data keys forward.
* a signing key, Ed25519: `sign`, `verify` and `public_key_pem`, with `signing_key_version`
  recorded so a signature names the key that made it.

The caller's associated data is bound into every wrap: a wrapped key only unwraps for the
same purpose (checkpoints bind job and step), the same key id and the same version.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aidc.errors import AidcError

DATA_KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce
SIGNATURE_ALGORITHM = "Ed25519"


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
    """One key id in one key store. Implementations: local, pkcs11 (aidc.kms.open_provider)."""

    provider: str
    key_id: str

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

    # -- signing ------------------------------------------------------------------------
    @property
    @abstractmethod
    def signing_key_version(self) -> int:
        """The version of the signing key `sign` uses (record it beside each signature)."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of `data` by the current signing key."""

    @abstractmethod
    def public_key_pem(self) -> str:
        """The current signing key's public half (SubjectPublicKeyInfo PEM)."""

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True when `signature` is the current signing key's signature of `data`."""
        return verify_with_pem(self.public_key_pem(), data, signature)

    def status(self) -> dict:
        return {"provider": self.provider, "key_id": self.key_id, "kek_versions": self.versions(),
                "current_version": self.current_version(), "kek_algorithm": "AES-256-GCM",
                "signing_algorithm": SIGNATURE_ALGORITHM, "signing_key_version": self.signing_key_version}

    def close(self) -> None:
        """Release sessions or handles (nothing for most providers)."""


@functools.lru_cache(maxsize=16)
def _public_key(public_pem: str) -> Ed25519PublicKey:
    # Parsed once per PEM: verifying a signed audit log checks one signature per record.
    try:
        key = serialization.load_pem_public_key(public_pem.encode())
    except ValueError as exc:
        raise KmsError(f"not a public key PEM: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KmsError(f"expected an {SIGNATURE_ALGORITHM} public key, got {type(key).__name__}")
    return key


def verify_with_pem(public_pem: str, data: bytes, signature: bytes) -> bool:
    """Verify an Ed25519 signature with a public key PEM: no provider (or PIN) needed."""
    key = _public_key(public_pem)
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
