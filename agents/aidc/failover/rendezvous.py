"""Tell a torchrun c10d rendezvous at once that a quarantined node is gone.

Left alone, the rendezvous notices a dead node only when its heartbeat expires
(keep_alive_interval x keep_alive_max_attempt, 3 s at best), and the survivors'
next round waits for that. Failover already knows the node is gone, so it marks the
node's last heartbeat as expired in the shared rendezvous state (a compare-and-set on
the store key, retried on conflict); the next sync of any survivor removes it, exactly
as its own expiry check would. Nothing else in the state is touched.

Trust boundary: torch keeps that state as a pickle in a TCPStore that anyone who can
connect to may write, and unpickling runs code named by the data. So the controller
talks only to a store on loopback or on a network listed as trusted (which must be
private), and reads the state with an unpickler that builds nothing but the classes
torch's rendezvous state is made of; anything else in the store is refused unread.
"""

from __future__ import annotations

import io
import ipaddress
import pickle
import socket
from base64 import b64decode, b64encode
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from aidc.errors import AidcError

EXPIRED = datetime(1970, 1, 1, tzinfo=timezone.utc)
# What the c10d backend stores before the first state: base64 of no pickle at all.
NO_STATE_YET = b"Y2FuaW1hZGFt"


def state_key(run_id: str) -> str:
    return "torch.rendezvous." + run_id  # the c10d backend's key for this run


_STATE_MODULE = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"
# What pickle.dumps(_RendezvousState) names (torch 2.x): the state, its node descriptors,
# and the datetimes of deadlines and heartbeats. Containers are pickle opcodes, not classes.
STATE_CLASSES = frozenset({(_STATE_MODULE, "_RendezvousState"), (_STATE_MODULE, "_NodeDesc"),
                           ("datetime", "datetime"), ("datetime", "timedelta"), ("datetime", "timezone")})


class UntrustedRendezvous(AidcError):
    """The rendezvous store is not on a trusted network, or its state is not a rendezvous state."""


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in STATE_CLASSES:
            raise UntrustedRendezvous(f"rendezvous state names {module}.{name}, which is not part of a "
                                      "torch rendezvous state: refusing to load it")
        return super().find_class(module, name)


def load_state(state_bits: bytes):
    """Unpickle a rendezvous state, building only the classes such a state is made of."""
    state = _StateUnpickler(io.BytesIO(state_bits)).load()
    if type(state).__name__ != "_RendezvousState":
        raise UntrustedRendezvous(f"rendezvous state is a {type(state).__name__}, not a _RendezvousState")
    return state


def check_trusted_host(host: str, trusted_networks: Iterable[str] = ()) -> None:
    """Refuse a store whose every address is not loopback or in a listed private network."""
    networks = []
    for net in trusted_networks:
        network = ipaddress.ip_network(net, strict=False)
        if not network.is_private:
            raise UntrustedRendezvous(f"trusted network {net} is not a private network")
        networks.append(network)
    try:
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0])
                     for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, ValueError) as exc:
        raise UntrustedRendezvous(f"cannot resolve rendezvous host {host!r}: {exc}") from None
    for addr in addresses:
        if not (addr.is_loopback or any(addr in n for n in networks)):
            raise UntrustedRendezvous(
                f"rendezvous store {host} ({addr}) is not on loopback or a trusted private network: its "
                "state is unauthenticated pickle, so the controller does not read it there")


def expire_nodes(state_bits: bytes, match) -> tuple[bytes, list[str]]:
    """Return new state bytes with matching nodes' heartbeats expired, and their names."""
    state = load_state(state_bits)
    hit = [node for node, beat in state.last_heartbeats.items() if match(node) and beat != EXPIRED]
    for node in hit:
        state.last_heartbeats[node] = EXPIRED
    return pickle.dumps(state), [repr(n) for n in hit]


def evict(host: str, port: int, run_id: str, *, pids: set[int] | None = None, addr: str | None = None,
          attempts: int = 20, timeout_s: float = 5.0, trusted_networks: Iterable[str] = ()) -> list[str]:
    """Expire the heartbeats of the rendezvous nodes with these agent pids (or this address).

    Returns the nodes expired (empty when none matched: already gone, or not joined).
    `trusted_networks`: private networks (CIDR) besides loopback where a store may be.
    """
    from torch.distributed import TCPStore

    if not pids and not addr:
        raise ValueError("evict needs pids or addr")
    check_trusted_host(host, trusted_networks)

    def match(node) -> bool:
        return (pids is not None and node.pid in pids) or (addr is not None and node.addr == addr)

    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    key = state_key(run_id)
    for _ in range(attempts):
        if not store.check([key]):
            return []
        current = store.get(key)
        if current == NO_STATE_YET:
            return []
        # A state that is not one is refused (UntrustedRendezvous), never loaded.
        new_bits, hit = expire_nodes(b64decode(current), match)
        if not hit:
            return []
        result = store.compare_set(key, current, b64encode(new_bits))
        if result == b64encode(new_bits):
            return hit
    raise RuntimeError(f"rendezvous state of {run_id} kept changing; gave up after {attempts} attempts")


def read_state(host: str, port: int, run_id: str, timeout_s: float = 5.0, trusted_networks: Iterable[str] = ()):
    """The rendezvous state as torch keeps it (participants, wait and redundancy lists), or None."""
    from torch.distributed import TCPStore

    check_trusted_host(host, trusted_networks)
    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    key = state_key(run_id)
    if not store.check([key]):
        return None
    current = store.get(key)
    return None if current == NO_STATE_YET else load_state(b64decode(current))
