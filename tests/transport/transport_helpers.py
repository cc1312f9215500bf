"""Helpers for the transport tests: the lab's node names, a controller's listener on a thread."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from aidc import polling
from aidc.runbook.tls import TLSConfig
from aidc.spec import load_stack
from aidc.transport.forwarder import ClientTLS
from aidc.transport.ingest import IngestServer

# The runbook tests' throwaway CA (real X.509 through `cryptography`), shared rather than copied.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runbook"))
from certs import CA  # noqa: E402

NODES = [n.name for n in load_stack("lab").nodes()]
ROOT_AGENTS = str(Path(__file__).resolve().parents[2] / "agents")


def wait_for(what: str, predicate, timeout_s: float = 20.0):
    return polling.wait_for(what, predicate, timeout_s, 0.02, error=AssertionError)


def agent_tls(pki, name: str) -> ClientTLS:
    return ClientTLS(pki[name].cert, pki[name].key, pki["ca"].cert_file)


class Controller:
    """The controller's listener on a fixed loopback port, stoppable and restartable."""

    def __init__(self, pki, directory: Path, relays: dict[str, set[str]] | None = None):
        self.pki, self.directory, self.relays = pki, directory, dict(relays or {})
        self.port = polling.free_port()
        self.store_path, self.audit_path = directory / "state.db", directory / "audit.db"
        self.lines: list[str] = []
        self.server: IngestServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> "Controller":
        tls = TLSConfig(self.pki["server"].cert, self.pki["server"].key, self.pki["ca"].cert_file)
        self.server = IngestServer(self.store_path, self.audit_path, set(NODES), tls, "127.0.0.1", self.port,
                                   relays=self.relays, log=self.lines.append)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.thread.join(timeout=10)
            self.server = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"
