"""Key management: key providers behind one interface (`KeyProvider`), registered by name.

`open_provider(spec.kms)` opens the provider the cluster spec names and fails at once, with one
clear error, when its keys cannot be reached (a missing or unreadable keyring, an absent
token, a refused PIN, an unknown KMS key). Providers: `local` (a keyring directory), `pkcs11`
(an HSM), `aws-kms` (AWS KMS). The other cloud providers the spec can name (`vault-transit`,
`gcp-kms`, `azure-keyvault`) are not built: `unavailable_reason` says so, and `aidc spec check`
reports it before anything tries to use the key.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from aidc.kms.base import (ECDSA_P256_SHA256, ED25519, SIGNATURE_ALGORITHMS, KeyProvider, KmsError,
                           KmsUnavailable, MissingKeyVersion, UnwrapError, WrappedKey, public_key_algorithm,
                           verify_with_pem)
from aidc.spec import Kms

DEFAULT_KEYRING = Path("/var/lib/aidc/keyring")


@dataclass(frozen=True)
class ProviderPlugin:
    module: str  # aidc.kms.<module>, imported only when the provider is used
    cls: str
    library: str | None  # the import the provider needs beyond aidc's core
    install: str  # how to get it


PROVIDERS = {
    "local": ProviderPlugin("local", "LocalKeyring", None, ""),
    "pkcs11": ProviderPlugin("pkcs11_provider", "Pkcs11Provider", "pkcs11", "pip install python-pkcs11 (aidc[agent])"),
    "aws-kms": ProviderPlugin("aws", "AwsKmsProvider", "boto3", "pip install boto3 (aidc[aws])"),
}
AVAILABLE = tuple(PROVIDERS)

__all__ = ["KeyProvider", "KmsError", "KmsUnavailable", "MissingKeyVersion", "UnwrapError", "WrappedKey",
           "open_provider", "create_provider", "keyring_path", "verify_with_pem", "public_key_algorithm",
           "unavailable_reason", "missing_library", "kms_from_reference", "open_from_reference", "AVAILABLE",
           "PROVIDERS", "ED25519", "ECDSA_P256_SHA256", "SIGNATURE_ALGORITHMS"]


def keyring_path(kms: Kms, lab_dir: str | os.PathLike | None = None) -> Path:
    """Where the local keyring lives: the lab's own, else the spec's, else the default."""
    if lab_dir is not None:
        return Path(lab_dir) / "keyring"
    return Path(kms.keyring) if kms.keyring else DEFAULT_KEYRING


def unavailable_reason(provider: str) -> str | None:
    """Why this build lacks `provider` (not built); None when it has it."""
    if provider in PROVIDERS:
        return None
    return f"kms provider {provider!r} is not available in this build (available: {', '.join(AVAILABLE)})"


def missing_library(provider: str) -> str | None:
    """Which library `provider` needs that is not installed here, with how to install it; None
    when nothing is missing. Only an import check: reaching the key is `open_provider`'s job."""
    plugin = PROVIDERS.get(provider)
    if plugin is None or not plugin.library or importlib.util.find_spec(plugin.library) is not None:
        return None
    return f"kms provider {provider!r} needs {plugin.library}, which is not installed here ({plugin.install})"


def _provider_class(kms: Kms) -> type:
    # Only "not built" is refused here: a missing library is reported by the provider itself
    # when it is opened (KmsUnavailable with the same advice).
    plugin = PROVIDERS.get(kms.provider)
    if plugin is None:
        raise KmsUnavailable(unavailable_reason(kms.provider))
    return getattr(importlib.import_module(f"aidc.kms.{plugin.module}"), plugin.cls)


def open_provider(kms: Kms, lab_dir: str | os.PathLike | None = None) -> KeyProvider:
    """Open the spec's existing key; KmsError now if it cannot be used."""
    return _provider_class(kms).from_spec(kms, lab_dir)


def create_provider(kms: Kms, lab_dir: str | os.PathLike | None = None) -> KeyProvider:
    """Create the spec's key (KEK version 1 and a signing key); refuses if it exists."""
    return _provider_class(kms).create_from_spec(kms, lab_dir)


# The key reference Pulumi publishes (ConfigMap aidc-system/aidc-kms, infra/aidc_infra/kms.py):
# flat string keys, sections flattened with a prefix. Keys it carries for people ("envelope")
# are not settings.
_REFERENCE_SECTIONS = ("pkcs11", "aws")
_REFERENCE_INFORMATIONAL = {"envelope"}


def kms_from_reference(data: dict[str, str]) -> Kms:
    """The `Kms` settings from the key reference's data (as the ConfigMap holds them);
    KmsError naming the problem when they are not valid settings."""
    from pydantic import ValidationError

    settings: dict = {}
    for key, value in data.items():
        if key in _REFERENCE_INFORMATIONAL:
            continue
        section = next((s for s in _REFERENCE_SECTIONS if key.startswith(s + "_")), None)
        if key == "rotation_days":  # ConfigMap data is all strings; the spec's field is a number
            if not value.isdigit():
                raise KmsError(f"the KMS key reference's rotation_days is not a number: {value!r}")
            settings[key] = int(value)
        elif section is None:
            settings[key] = value
        else:
            settings.setdefault(section, {})[key[len(section) + 1:]] = value
    try:
        return Kms.model_validate(settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "-"
        raise KmsError(f"the KMS key reference is not valid settings: {where}: {first['msg']}") from None


def open_from_reference(directory: str | os.PathLike) -> KeyProvider:
    """Open the key a mounted key-reference ConfigMap names (one file per key, as Kubernetes
    mounts a ConfigMap): how a trainer pod reaches the cluster's key without the stack file."""
    root = Path(directory)
    try:
        files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        data = {p.name: p.read_text().strip() for p in files}
    except OSError as exc:
        raise KmsError(f"cannot read the KMS key reference at {root}: {exc.strerror or exc}") from None
    if not data:
        raise KmsError(f"no KMS key reference at {root} (mount the aidc-kms ConfigMap there)")
    return open_provider(kms_from_reference(data))
