"""Tell a torchrun c10d rendezvous at once that a quarantined node is gone.

Left alone, the rendezvous notices a dead node only when its heartbeat expires
(keep_alive_interval x keep_alive_max_attempt, 3 s at best), and the survivors'
next round waits for that. Failover already knows the node is gone, so it marks the
node's last heartbeat as expired in the shared rendezvous state (a compare-and-set on
the store key, retried on conflict); the next sync of any survivor removes it, exactly
as its own expiry check would. Nothing else in the state is touched (`evict`).

Faster still (`commit_next_round`): the controller writes the next round itself, complete,
with the survivors and a warm spare from the redundancy list, ranks assigned as torch
assigns them (sorted nodes). Without it every survivor leaves the old round, waits, and
joins the new one, and the spare leaves the redundancy list and joins: a dozen
compare-and-set writes of the whole state by five processes, which collide and retry
(1-3.5 s of a failover on 2 busy cores). With it each agent only reads the round it is
in. It needs agents that stay in a round committed for them instead of leaving it (the
lab's launcher, `aidc.lab.node_launcher`), so only the lab uses it; where it cannot
apply (no spare, a round already changing, a node that is not a member) it changes
nothing and the caller evicts instead.

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


def next_round(state, match, world_size: int):
    """The state after `state` with the next round complete: the members of the current,
    complete round except the matching (quarantined) nodes, topped up to `world_size` from
    the redundancy list; None when that round cannot be formed (the state is not a
    complete round with a matching member, or there are too few spares)."""
    if state.closed or not state.complete or not any(match(n) for n in state.participants):
        return None
    # A survivor that already left the round waits on the wait list (and a spare that saw it
    # leave moved there too): both belong to the next round.
    members = {n for n in state.participants if not match(n)} | {n for n in state.wait_list if not match(n)}
    spares = sorted(n for n in state.redundancy_list if not match(n) and n not in members)
    need = world_size - len(members)
    if need < 0 or need > len(spares):
        return None
    chosen = members | set(spares[:need])
    now = datetime.now(timezone.utc)
    state.round += 1
    state.complete, state.deadline = True, None
    state.participants = {node: rank for rank, node in enumerate(sorted(chosen))}  # as torch ranks them
    state.wait_list = {n for n in state.wait_list if n not in chosen and not match(n)}
    state.redundancy_list = {n for n in state.redundancy_list if n not in chosen and not match(n)}
    beats = {n: beat for n, beat in state.last_heartbeats.items() if not match(n)}
    beats.update({n: now for n in chosen})  # alive now: they were, a moment ago, and keep beating
    state.last_heartbeats = beats
    return state


def _update_state(host: str, port: int, run_id: str, change, *, attempts: int, timeout_s: float,
                  trusted_networks: Iterable[str]):
    """Compare-and-set `change(state)` into the store, retried while others write; `change`
    returns (new state or None for no change, what to return)."""
    from torch.distributed import TCPStore

    check_trusted_host(host, trusted_networks)
    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    key = state_key(run_id)
    for _ in range(attempts):
        if not store.check([key]):
            return None
        current = store.get(key)
        if current == NO_STATE_YET:
            return None
        # A state that is not one is refused (UntrustedRendezvous), never loaded.
        new_state, result = change(load_state(b64decode(current)))
        if new_state is None:
            return result
        new_bits = b64encode(pickle.dumps(new_state))
        if store.compare_set(key, current, new_bits) == new_bits:
            return result
    raise RuntimeError(f"rendezvous state of {run_id} kept changing; gave up after {attempts} attempts")


def _matcher(pids: set[int] | None, addr: str | None):
    if not pids and not addr:
        raise ValueError("needs pids or addr")
    return lambda node: (pids is not None and node.pid in pids) or (addr is not None and node.addr == addr)


def evict(host: str, port: int, run_id: str, *, pids: set[int] | None = None, addr: str | None = None,
          attempts: int = 20, timeout_s: float = 5.0, trusted_networks: Iterable[str] = ()) -> list[str]:
    """Expire the heartbeats of the rendezvous nodes with these agent pids (or this address).

    Returns the nodes expired (empty when none matched: already gone, or not joined).
    `trusted_networks`: private networks (CIDR) besides loopback where a store may be.
    """
    match = _matcher(pids, addr)

    def expire(state):
        hit = [node for node, beat in state.last_heartbeats.items() if match(node) and beat != EXPIRED]
        for node in hit:
            state.last_heartbeats[node] = EXPIRED
        return (state if hit else None), [repr(n) for n in hit]

    return _update_state(host, port, run_id, expire, attempts=attempts, timeout_s=timeout_s,
                         trusted_networks=trusted_networks) or []


def commit_next_round(host: str, port: int, run_id: str, world_size: int, *, pids: set[int] | None = None,
                      addr: str | None = None, attempts: int = 20, timeout_s: float = 5.0,
                      trusted_networks: Iterable[str] = ()) -> dict | None:
    """Write the next round, complete, without the nodes with these agent pids (or this
    address): `next_round`. Returns {"round", "participants": {node: rank}} as committed, or
    None when it could not apply (then nothing was written)."""
    match = _matcher(pids, addr)

    def commit(state):
        new = next_round(state, match, world_size)
        if new is None:
            return None, None
        return new, {"round": new.round, "participants": {repr(n): r for n, r in new.participants.items()}}

    return _update_state(host, port, run_id, commit, attempts=attempts, timeout_s=timeout_s,
                         trusted_networks=trusted_networks)


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
