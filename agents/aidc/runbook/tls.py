"""TLS for `aidc runbook serve`: HTTPS, and mutual TLS when a client CA is given.

Alertmanager's webhook `http_config.tls_config` (`ca_file`, `cert_file`, `key_file`) is the
other side. With a client CA the handshake itself refuses a sender without a certificate
signed by that CA, before any HTTP is read; the bearer token, when also set, is checked on
top. The handshake runs on the server's I/O thread under the request's header deadline
(`aidc.runbook.http_server`), so a client that stalls in it holds no thread. Certificates are loaded when the receiver starts, so a bad path or PEM is a clear
error at start-up rather than a refused connection later.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from aidc.errors import AidcError


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: mutual TLS, a client certificate is required

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        for what, path in (("--tls-cert", self.cert_file), ("--tls-key", self.key_file),
                           ("--client-ca", self.client_ca_file)):
            if path is not None and not Path(path).is_file():
                raise AidcError(f"{what} {path}: no such file")
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except ssl.SSLError as exc:
            raise AidcError(f"--tls-cert {self.cert_file} / --tls-key {self.key_file}: "
                            f"not a matching PEM certificate and key ({exc.reason or exc})") from None
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.client_ca_file))
            except ssl.SSLError as exc:
                raise AidcError(f"--client-ca {self.client_ca_file}: not a PEM CA certificate "
                                f"({exc.reason or exc})") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def from_options(cert: Path | None, key: Path | None, client_ca: Path | None) -> TLSConfig | None:
    """The CLI's three options as one config; half a configuration is an error, not plain HTTP."""
    if cert is None and key is None:
        if client_ca is not None:
            raise AidcError("--client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        return None
    if cert is None or key is None:
        raise AidcError("--tls-cert and --tls-key go together")
    return TLSConfig(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def certificate_names(sock) -> frozenset[str]:
    """The names a verified client certificate vouches for: its CN and its DNS subjectAltNames."""
    getpeercert = getattr(sock, "getpeercert", None)
    cert = getpeercert() if getpeercert else None
    if not cert:
        return frozenset()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    return frozenset(names)


def peer_identity(sock) -> str | None:
    """`CN=...` of a verified client certificate, for the log and the audit trigger."""
    getpeercert = getattr(sock, "getpeercert", None)
    cert = getpeercert() if getpeercert else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return f"CN={value}"
    return "client certificate without a common name"
