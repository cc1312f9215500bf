"""The rendezvous store a burn-in run owns, and what crosses it: JSON objects, never pickles.

The command that launches the run hosts a TCPStore on a port the kernel picks, listening on the
run's address only (TCPStore alone would listen on every interface). TCPStore has no
authentication: anyone who can reach that port can connect. So every key the run uses lives
under a fresh 256-bit secret prefix (`PrefixStore`) that only the run's nodes learn (from a
0600 config file, or from the job's environment): a client without it finds none of the run's
keys and cannot read or forge a node's config or result by name. What remains: such a client
can still connect, count keys and load the store (a denial of service, which ends the run at its
timeout, never a false certificate). Every value read is parsed as a JSON object or refused.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

from aidc.errors import BurninError


def store_secret() -> str:
    """A fresh per-run key prefix for the rendezvous store (256 bits)."""
    return secrets.token_hex(32)


def listening_store(host: str, timeout_s: float):
    """A TCPStore server that listens on `host` only, on a port the kernel picks.

    TCPStore's own server listens on every interface whatever host it is given; so the socket
    is bound here and handed over (`master_listen_fd`; the store owns it from then on)."""
    import socket

    import torch.distributed as dist

    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(1024)
        port = sock.getsockname()[1]
        store = dist.TCPStore(host, port, world_size=None, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s), master_listen_fd=sock.fileno(), use_libuv=True)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store closes it
    return store


def keyed_store(store, secret: str):
    """`store` with every key under `secret/`: what the nodes see (aidc.burnin.worker)."""
    import torch.distributed as dist

    return dist.PrefixStore(secret, store)


class _JsonStore:
    store = None  # the keyed store

    def put_json(self, key: str, value: dict) -> None:
        self.store.set(key, json.dumps(value))

    def get_json(self, key: str) -> dict:
        """The JSON object under `key`; BurninError when it is missing or anything else."""
        if not self.store.check([key]):
            raise BurninError(f"the burn-in store holds no {key!r}")
        raw = self.store.get(key)
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BurninError(f"the burn-in store's {key!r} is not JSON ({len(raw)} bytes); refused") from None
        if not isinstance(value, dict):
            raise BurninError(f"the burn-in store's {key!r} is JSON but not an object; refused")
        return value


class JobStore(_JsonStore):
    """The store a run hosts where the command runs: `with JobStore(host, timeout_s) as s:`;
    `s.port` and `s.secret` are what the nodes need."""

    def __init__(self, host: str, timeout_s: float):
        self.host, self.timeout_s = host, timeout_s
        self.secret = store_secret()
        self.master = None

    def __enter__(self) -> "JobStore":
        try:
            self.master = listening_store(self.host, self.timeout_s)
        except OSError as exc:  # an address this machine does not have, or a name that does not resolve
            raise BurninError(f"the burn-in store cannot listen on {self.host}: {exc.strerror or exc}"
                              " (store_host must be an address of this machine)") from None
        self.port = self.master.port
        self.store = keyed_store(self.master, self.secret)
        return self

    def __exit__(self, *exc) -> None:
        self.store = self.master = None  # the server thread ends with its last reference


class NodeStoreClient(_JsonStore):
    """A node's connection to its run's store."""

    def __init__(self, host: str, port: int, secret: str, timeout_s: float):
        import torch.distributed as dist

        self.store = keyed_store(dist.TCPStore(host, port, world_size=None, is_master=False,
                                               timeout=timedelta(seconds=timeout_s)), secret)
