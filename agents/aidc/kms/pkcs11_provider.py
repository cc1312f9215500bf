"""The pkcs11 provider: keys that never leave an HSM (python-pkcs11; SoftHSM2 in tests).

Objects on the token, all with CKA_TOKEN, the private and secret ones sensitive and not
extractable:

    <key_id>/kek/v<N>      AES-256 secret key: key-encryption key version N (the highest is current)
    <key_id>/sign/v<N>     Ed25519 key pair (CKM_EC_EDWARDS_KEY_PAIR_GEN, signed with CKM_EDDSA)

Wrap and unwrap are AES-GCM inside the token (the data key goes in and out; the KEK never
does). The PIN comes from the environment variable or the file the spec names, never from the
stack file. SoftHSM 2.6.1 here does AES-GCM and EdDSA (it lacks ECDSA-with-SHA256).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aidc.kms.base import (DATA_KEY_BYTES, NONCE_BYTES, KeyProvider, KmsError, KmsUnavailable, MissingKeyVersion,
                           UnwrapError, WrappedKey, wrap_aad)
from aidc.spec import Pkcs11

ED25519_OID = "1.3.101.112"


def read_pin(settings: Pkcs11) -> str:
    """The user PIN: $pin_env when set, else the first line of pin_file (which must be 0600)."""
    if settings.pin_env and os.environ.get(settings.pin_env):
        return os.environ[settings.pin_env]
    if settings.pin_file:
        p = Path(settings.pin_file)
        try:
            mode = p.stat().st_mode
            if mode & 0o077:
                raise KmsError(f"PIN file {p} is accessible to group or others (mode {mode & 0o777:04o}); make it 0600")
            text = p.read_text().strip()
            pin = text.splitlines()[0].strip() if text else ""
        except OSError as exc:
            raise KmsError(f"cannot read the PIN file {p}: {exc.strerror}") from None
        if not pin:
            raise KmsError(f"PIN file {p} is empty")
        return pin
    where = " or ".join(w for w in (f"${settings.pin_env}" if settings.pin_env else "",
                                    f"pin_file {settings.pin_file}" if settings.pin_file else "") if w)
    raise KmsError(f"no PIN for token {settings.token_label!r}: set {where or 'kms.pkcs11.pin_env or pin_file'}")


class Pkcs11Provider(KeyProvider):
    provider = "pkcs11"

    def __init__(self, settings: Pkcs11, key_id: str, _create: bool = False):
        try:
            import pkcs11
        except ImportError:
            raise KmsUnavailable("kms provider 'pkcs11' needs python-pkcs11 (pip install python-pkcs11)") from None
        self._p11 = pkcs11
        self.settings, self.key_id = settings, key_id
        if not Path(settings.module).exists():
            raise KmsError(f"PKCS#11 module {settings.module} does not exist (Debian: apt-get install softhsm2, "
                           "or the HSM vendor's library)")
        try:
            lib = pkcs11.lib(settings.module)
        except (RuntimeError, OSError) as exc:
            raise KmsError(f"cannot load PKCS#11 module {settings.module}: {exc}") from None
        try:
            token = lib.get_token(token_label=settings.token_label)
        except pkcs11.exceptions.NoSuchToken:
            raise KmsError(f"no token labelled {settings.token_label!r} in {settings.module} "
                           "(for SoftHSM2: is SOFTHSM2_CONF pointing at its token directory?)") from None
        except pkcs11.exceptions.PKCS11Error as exc:
            raise KmsError(f"PKCS#11 module {settings.module}: cannot list tokens ({type(exc).__name__})") from None
        self._session_key = (settings.module, settings.token_label)
        self._session = _acquire_session(pkcs11, token, self._session_key, read_pin(settings))
        if not _create and not self.versions():
            self.close()
            raise KmsError(f"token {settings.token_label!r} holds no key {key_id!r} (create it with `aidc kms init`)")

    @classmethod
    def from_spec(cls, kms, lab_dir=None) -> "Pkcs11Provider":
        return cls(kms.pkcs11, kms.key_id)

    @classmethod
    def create_from_spec(cls, kms, lab_dir=None) -> "Pkcs11Provider":
        return cls.create(kms.pkcs11, kms.key_id)

    @classmethod
    def create(cls, settings: Pkcs11, key_id: str) -> "Pkcs11Provider":
        """Generate KEK version 1 and the signing key pair on the token; refuse if the key exists."""
        self = cls(settings, key_id, _create=True)
        if self.versions():
            self.close()
            raise KmsError(f"token {settings.token_label!r} already holds key {key_id!r}")
        self._generate_kek(1)
        p11 = self._p11
        A = p11.Attribute
        from pkcs11.util.ec import encode_named_curve_parameters

        self._session.generate_keypair(
            p11.KeyType.EC_EDWARDS, None, mechanism=p11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True,
            label=self._label("sign", 1),
            public_template={A.EC_PARAMS: encode_named_curve_parameters(ED25519_OID)},
            private_template={A.SENSITIVE: True, A.EXTRACTABLE: False})
        return self

    def _label(self, kind: str, version: int) -> str:
        return f"{self.key_id}/{kind}/v{version}"

    def _generate_kek(self, version: int) -> None:
        A = self._p11.Attribute
        self._session.generate_key(self._p11.KeyType.AES, DATA_KEY_BYTES * 8, store=True,
                                   label=self._label("kek", version),
                                   template={A.SENSITIVE: True, A.EXTRACTABLE: False})

    def _versions_of(self, kind: str, object_class) -> list[int]:
        pattern = re.compile(re.escape(f"{self.key_id}/{kind}/v") + r"([0-9]{1,9})$")
        found = set()
        for obj in self._session.get_objects({self._p11.Attribute.CLASS: object_class}):
            m = pattern.match(obj.label or "")
            if m:
                found.add(int(m.group(1)))
        return sorted(found)

    def _one(self, object_class, label: str):
        try:
            return self._session.get_key(object_class=object_class, label=label)
        except self._p11.exceptions.NoSuchKey:
            return None

    # -- the interface --------------------------------------------------------------------
    def versions(self) -> list[int]:
        return self._versions_of("kek", self._p11.ObjectClass.SECRET_KEY)

    def current_version(self) -> int:
        versions = self.versions()
        if not versions:
            raise KmsError(f"token {self.settings.token_label!r} holds no key {self.key_id!r}")
        return versions[-1]

    def _kek(self, version: int):
        key = self._one(self._p11.ObjectClass.SECRET_KEY, self._label("kek", version))
        if key is None:
            raise MissingKeyVersion(f"key {self.key_id!r} version {version} is not on token "
                                    f"{self.settings.token_label!r} (it holds versions "
                                    f"{', '.join(map(str, self.versions())) or 'none'})")
        return key

    def _gcm(self, nonce: bytes, aad: bytes):
        return self._p11.GCMParams(nonce, aad, 128)

    def wrap(self, data_key: bytes, aad: bytes) -> WrappedKey:
        version = self.current_version()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._kek(version).encrypt(data_key, mechanism=self._p11.Mechanism.AES_GCM,
                                            mechanism_param=self._gcm(nonce, wrap_aad(self.key_id, version, aad)))
        return WrappedKey(self.key_id, version, nonce + bytes(sealed))

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.key_id != self.key_id:
            raise UnwrapError(f"wrapped under key {wrapped.key_id!r}; this provider holds {self.key_id!r}")
        kek = self._kek(wrapped.version)
        nonce, sealed = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        try:
            return bytes(kek.decrypt(sealed, mechanism=self._p11.Mechanism.AES_GCM,
                                     mechanism_param=self._gcm(nonce, wrap_aad(self.key_id, wrapped.version, aad))))
        except self._p11.exceptions.PKCS11Error:
            # SoftHSM answers a failed GCM tag with CKR_GENERAL_ERROR; nothing is released.
            raise UnwrapError(f"the data key does not unwrap with key {self.key_id!r} version {wrapped.version} "
                              f"on token {self.settings.token_label!r} (another key, or a tampered or "
                              "misplaced header)") from None

    def rotate(self) -> int:
        version = self.current_version() + 1
        self._generate_kek(version)
        return version

    @property
    def signing_key_version(self) -> int:
        versions = self._versions_of("sign", self._p11.ObjectClass.PRIVATE_KEY)
        if not versions:
            raise KmsError(f"token {self.settings.token_label!r} holds no signing key for {self.key_id!r}")
        return versions[-1]

    def sign(self, data: bytes) -> bytes:
        version = self.signing_key_version
        key = self._one(self._p11.ObjectClass.PRIVATE_KEY, self._label("sign", version))
        return bytes(key.sign(data, mechanism=self._p11.Mechanism.EDDSA))

    def public_key_pem(self) -> str:
        version = self.signing_key_version
        pub = self._one(self._p11.ObjectClass.PUBLIC_KEY, self._label("sign", version))
        if pub is None:
            raise KmsError(f"token {self.settings.token_label!r}: the public half of {self._label('sign', version)} "
                           "is missing")
        point = bytes(pub[self._p11.Attribute.EC_POINT])
        # CKA_EC_POINT is a DER OCTET STRING around the 32 raw bytes (some tokens give them bare).
        raw = point[2:] if len(point) == 34 and point[:2] == b"\x04\x20" else point
        return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def status(self) -> dict:
        return {**super().status(), "module": self.settings.module, "token_label": self.settings.token_label}

    def close(self) -> None:
        session, self._session = getattr(self, "_session", None), None
        if session is not None:
            _release_session(self._session_key)


# PKCS#11 logs in per application, not per session: a second C_Login from this process fails
# (CKR_USER_ALREADY_LOGGED_IN) and closing any logged-in session logs all of them out. So one
# logged-in session per token is shared in the process and closed with its last user. A later
# opener must present the same PIN (compared as a digest), as the token would demand.
_SESSIONS: dict[tuple[str, str], list] = {}  # (module, token label) -> [session, PIN digest, users]
_SESSIONS_LOCK = threading.Lock()


def _acquire_session(pkcs11, token, key: tuple[str, str], pin: str):
    digest = hashlib.sha256(pin.encode()).digest()
    with _SESSIONS_LOCK:
        shared = _SESSIONS.get(key)
        if shared is not None:
            if not hmac.compare_digest(shared[1], digest):
                raise KmsError(f"token {key[1]!r} refused the PIN (not the PIN this process logged in with)")
            shared[2] += 1
            return shared[0]
        try:
            session = token.open(user_pin=pin, rw=True)
        except pkcs11.exceptions.PinIncorrect:
            raise KmsError(f"token {key[1]!r} refused the PIN") from None
        except pkcs11.exceptions.PKCS11Error as exc:
            raise KmsError(f"cannot log in to token {key[1]!r} ({type(exc).__name__})") from None
        _SESSIONS[key] = [session, digest, 1]
        return session


def _release_session(key: tuple[str, str]) -> None:
    with _SESSIONS_LOCK:
        shared = _SESSIONS.get(key)
        if shared is None:
            return
        shared[2] -= 1
        if shared[2] <= 0:
            del _SESSIONS[key]
            shared[0].close()
