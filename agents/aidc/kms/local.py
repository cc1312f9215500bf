"""The local provider: a keyring directory on this machine.

Layout (directory 0700, every file 0600, owned by the user running aidc):

    keyring.json        {"format": 1, "key_id": ..., "current": N, "kek": {"1": {"created": t}, ...},
                         "signing": {"version": 1, "created": t}}
    kek-v<N>.key        32 random bytes: AES-256 key-encryption key version N
    signing-v<N>.pem    Ed25519 private key (PKCS#8 PEM)

The keys are only as secret as the directory: anyone who can read it (root, the owner, a
backup of it) can unwrap every data key. A keyring that is group- or world-accessible is
refused, as ssh refuses such a private key. An HSM (the pkcs11 provider) keeps the keys
inside the device instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aidc.files import open_nofollow, write_atomic
from aidc.kms.base import (DATA_KEY_BYTES, NONCE_BYTES, KeyProvider, KmsError, MissingKeyVersion, UnwrapError,
                           WrappedKey, wrap_aad)

FORMAT = 1
MANIFEST = "keyring.json"


class LocalKeyring(KeyProvider):
    provider = "local"

    def __init__(self, path: str | os.PathLike, key_id: str | None = None):
        """Open an existing keyring; a missing, unreadable or too-open one is a KmsError now."""
        self.path = Path(path)
        self._kek_cache: dict[int, bytes] = {}
        manifest = self._read_manifest()
        self.key_id = manifest["key_id"]
        if key_id is not None and key_id != self.key_id:
            raise KmsError(f"keyring {self.path} holds key {self.key_id!r}, but the spec names {key_id!r}")
        self._signing_version = int(manifest["signing"]["version"])
        self._signing_key = self._load_signing_key(self._signing_version)

    @classmethod
    def from_spec(cls, kms, lab_dir=None) -> "LocalKeyring":
        from aidc.kms import keyring_path

        return cls(keyring_path(kms, lab_dir), kms.key_id)

    @classmethod
    def create_from_spec(cls, kms, lab_dir=None) -> "LocalKeyring":
        from aidc.kms import keyring_path

        return cls.create(keyring_path(kms, lab_dir), kms.key_id)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, key_id: str) -> "LocalKeyring":
        """Make a new keyring (KEK version 1, signing key version 1). Refuses to overwrite one."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise KmsError(f"a keyring already exists at {path}")
        if path.exists() and any(path.iterdir()):
            raise KmsError(f"{path} is not empty and holds no keyring: choose a new directory")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        _write_private(path / "kek-v1.key", os.urandom(DATA_KEY_BYTES))
        signing = Ed25519PrivateKey.generate()
        _write_private(path / "signing-v1.pem", signing.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        now = time.time()
        _write_private(path / MANIFEST, json.dumps(
            {"format": FORMAT, "key_id": key_id, "current": 1, "kek": {"1": {"created": now}},
             "signing": {"version": 1, "created": now}}, indent=1).encode())
        return cls(path, key_id)

    # -- reading ------------------------------------------------------------------------
    def _check_private(self, p: Path, what: str) -> None:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise KmsError(f"keyring {self.path}: {what} {p.name} is missing") from None
        except OSError as exc:
            raise KmsError(f"keyring {self.path}: cannot read {p.name}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            raise KmsError(f"keyring {self.path}: {p.name} is accessible to group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}); it must be 0{'700' if p.is_dir() else '600'}")
        if st.st_uid != os.geteuid():
            raise KmsError(f"keyring {self.path}: {p.name} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")

    def _read(self, p: Path, what: str) -> bytes:
        self._check_private(p, what)
        try:
            return p.read_bytes()
        except OSError as exc:
            raise KmsError(f"keyring {self.path}: cannot read {p.name}: {exc.strerror}") from None

    def _read_manifest(self) -> dict:
        if not self.path.exists():
            raise KmsError(f"no keyring at {self.path} (create one with `aidc kms init`)")
        if not self.path.is_dir():
            raise KmsError(f"keyring {self.path} is not a directory")
        self._check_private(self.path, "directory")
        raw = self._read(self.path / MANIFEST, "manifest")
        try:
            manifest = json.loads(raw)
            current = int(manifest["current"])
            kek = {int(v) for v in manifest["kek"]}
            int(manifest["signing"]["version"])
            key_id = manifest["key_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise KmsError(f"keyring {self.path}: {MANIFEST} is not a keyring manifest ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise KmsError(f"keyring {self.path}: format {manifest.get('format')!r}, this build reads {FORMAT}")
        if not isinstance(key_id, str) or current not in kek:
            raise KmsError(f"keyring {self.path}: {MANIFEST} names current version {current}, "
                           f"which it does not list")
        return manifest

    def _load_signing_key(self, version: int) -> Ed25519PrivateKey:
        raw = self._read(self.path / f"signing-v{version}.pem", f"signing key version {version}")
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except ValueError as exc:
            raise KmsError(f"keyring {self.path}: signing-v{version}.pem is not a private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KmsError(f"keyring {self.path}: signing-v{version}.pem is not an Ed25519 key")
        return key

    def _kek(self, version: int) -> bytes:
        if version not in self._kek_cache:
            if version not in self.versions():
                raise MissingKeyVersion(f"key {self.key_id!r} version {version} is not in keyring {self.path} "
                                        f"(it holds versions {', '.join(map(str, self.versions()))})")
            key = self._read(self.path / f"kek-v{version}.key", f"key-encryption key version {version}")
            if len(key) != DATA_KEY_BYTES:
                raise KmsError(f"keyring {self.path}: kek-v{version}.key holds {len(key)} bytes, not {DATA_KEY_BYTES}")
            self._kek_cache[version] = key
        return self._kek_cache[version]

    # -- the interface --------------------------------------------------------------------
    def versions(self) -> list[int]:
        # Read each time: another process (`aidc kms rotate`) may have added a version.
        return sorted(int(v) for v in self._read_manifest()["kek"])

    def current_version(self) -> int:
        return int(self._read_manifest()["current"])

    def wrap(self, data_key: bytes, aad: bytes) -> WrappedKey:
        version = self.current_version()
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + AESGCM(self._kek(version)).encrypt(nonce, data_key, wrap_aad(self.key_id, version, aad))
        return WrappedKey(self.key_id, version, blob)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.key_id != self.key_id:
            raise UnwrapError(f"wrapped under key {wrapped.key_id!r}; keyring {self.path} holds {self.key_id!r}")
        kek = self._kek(wrapped.version)
        nonce, sealed = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        try:
            return AESGCM(kek).decrypt(nonce, sealed, wrap_aad(self.key_id, wrapped.version, aad))
        except (InvalidTag, ValueError):
            raise UnwrapError(f"the data key does not unwrap with key {self.key_id!r} version {wrapped.version} "
                              f"(another keyring's key, or a tampered or misplaced header)") from None

    def rotate(self) -> int:
        # One rotation at a time: two at once would both pick the same next version.
        lock_fd = open_nofollow(self.path / ".rotate.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            return self._rotate_locked()
        finally:
            os.close(lock_fd)

    def _rotate_locked(self) -> int:
        manifest = self._read_manifest()
        version = max(int(v) for v in manifest["kek"]) + 1
        _write_private(self.path / f"kek-v{version}.key", os.urandom(DATA_KEY_BYTES))
        manifest["kek"][str(version)] = {"created": time.time()}
        manifest["current"] = version
        # The manifest is replaced atomically after the key file exists: a crash in between
        # leaves an unused key file, never a current version without its key.
        _write_private(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
        return version

    @property
    def signing_key_version(self) -> int:
        return self._signing_version

    def sign(self, data: bytes) -> bytes:
        return self._signing_key.sign(data)

    def public_key_pem(self) -> str:
        return self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def status(self) -> dict:
        return {**super().status(), "keyring": str(self.path)}


def _write_private(path: Path, data: bytes) -> None:
    """Write a 0600 file atomically (temp file in the same directory, fsync, rename); a link
    at `path` is refused."""
    write_atomic(path, data, 0o600, durable=True)
