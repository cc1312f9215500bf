"""Key management: key providers behind one interface (`KeyProvider`).

`open_provider(spec.kms)` opens the provider the cluster spec names and fails at once, with one
clear error, when its keys cannot be reached (a missing or unreadable keyring, an absent
token, a refused PIN). Providers: `local` (a keyring directory), `pkcs11` (an HSM). The cloud
providers the spec can name (`aws-kms`, `vault-transit`, `gcp-kms`, `azure-keyvault`) keep their
place here and say they are not available in this build.
"""

from __future__ import annotations

import os
from pathlib import Path

from aidc.kms.base import (KeyProvider, KmsError, KmsUnavailable, MissingKeyVersion, UnwrapError, WrappedKey,
                           verify_with_pem)
from aidc.spec import Kms

DEFAULT_KEYRING = Path("/var/lib/aidc/keyring")
AVAILABLE = ("local", "pkcs11")

__all__ = ["KeyProvider", "KmsError", "KmsUnavailable", "MissingKeyVersion", "UnwrapError", "WrappedKey",
           "open_provider", "create_provider", "keyring_path", "verify_with_pem", "AVAILABLE"]


def keyring_path(kms: Kms, lab_dir: str | os.PathLike | None = None) -> Path:
    """Where the local keyring lives: the lab's own, else the spec's, else the default."""
    if lab_dir is not None:
        return Path(lab_dir) / "keyring"
    return Path(kms.keyring) if kms.keyring else DEFAULT_KEYRING


def _unavailable(kms: Kms) -> KmsUnavailable:
    return KmsUnavailable(f"kms provider {kms.provider!r} is not available in this build "
                          f"(available: {', '.join(AVAILABLE)})")


def open_provider(kms: Kms, lab_dir: str | os.PathLike | None = None) -> KeyProvider:
    """Open the spec's existing key; KmsError now if it cannot be used."""
    if kms.provider == "local":
        from aidc.kms.local import LocalKeyring

        return LocalKeyring(keyring_path(kms, lab_dir), kms.key_id)
    if kms.provider == "pkcs11":
        from aidc.kms.pkcs11_provider import Pkcs11Provider

        return Pkcs11Provider(kms.pkcs11, kms.key_id)
    raise _unavailable(kms)


def create_provider(kms: Kms, lab_dir: str | os.PathLike | None = None) -> KeyProvider:
    """Create the spec's key (KEK version 1 and a signing key); refuses if it exists."""
    if kms.provider == "local":
        from aidc.kms.local import LocalKeyring

        return LocalKeyring.create(keyring_path(kms, lab_dir), kms.key_id)
    if kms.provider == "pkcs11":
        from aidc.kms.pkcs11_provider import Pkcs11Provider

        return Pkcs11Provider.create(kms.pkcs11, kms.key_id)
    raise _unavailable(kms)
