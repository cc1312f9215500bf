"""A client of the health API (aidc.fleet.api): what `aidc fleet nodes|node|gpu` call. Mutual
TLS with the agents' kind of client certificate (aidc.transport.forwarder.ClientTLS), an optional
bearer token, bounded by a timeout; an answer other than 200 is an error that says the server's why."""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote, urlsplit

from aidc.errors import AidcError, PolicyRefusal
from aidc.transport.forwarder import ClientTLS


class ApiError(AidcError):
    """The health API answered with an error, or could not be reached."""


class HealthClient:
    def __init__(self, url: str, tls: ClientTLS, token: str | None = None, timeout_s: float = 10.0):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise AidcError(f"--url {url}: expected https://HOST:PORT (the controller's --listen)")
        self.host, self.port = parts.hostname, parts.port or 443
        self.context, self.token, self.timeout_s = tls.context(), token, timeout_s

    def get(self, *segments: str) -> dict:
        path = "/v1/" + "/".join(quote(str(s), safe="") for s in segments)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self.context)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except OSError as exc:  # refused, reset, a failed handshake (ssl.SSLError), a timeout
            raise ApiError(f"cannot reach the health API at https://{self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(f"{path}: HTTP {response.status}, not JSON") from None
        if response.status == 403:
            raise PolicyRefusal(f"{path}: {data.get('error', 'refused')}")
        if response.status != 200:
            raise ApiError(f"{path}: HTTP {response.status}: {data.get('error', '')}")
        return data

    def fleet(self) -> dict:
        return self.get("fleet")

    def nodes(self) -> list[dict]:
        return self.get("nodes")["nodes"]

    def node(self, node: str) -> dict:
        return self.get("nodes", node)

    def gpu(self, node: str, index: int) -> dict:
        return self.get("nodes", node, "gpus", str(index))
