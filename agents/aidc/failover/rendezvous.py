"""Tell a torchrun c10d rendezvous at once that a quarantined node is gone.

Left alone, the rendezvous notices a dead node only when its heartbeat expires
(keep_alive_interval x keep_alive_max_attempt, 3 s at best), and the survivors'
next round waits for that. Failover already knows the node is gone, so it marks the
node's last heartbeat as expired in the shared rendezvous state (a compare-and-set on
the store key, retried on conflict); the next sync of any survivor removes it, exactly
as its own expiry check would. Nothing else in the state is touched.
"""

from __future__ import annotations

import pickle
from base64 import b64decode, b64encode
from datetime import datetime, timedelta, timezone

EXPIRED = datetime(1970, 1, 1, tzinfo=timezone.utc)


def state_key(run_id: str) -> str:
    return "torch.rendezvous." + run_id  # the c10d backend's key for this run


def expire_nodes(state_bits: bytes, match) -> tuple[bytes, list[str]]:
    """Return new state bytes with matching nodes' heartbeats expired, and their names."""
    state = pickle.loads(state_bits)
    hit = [node for node, beat in state.last_heartbeats.items() if match(node) and beat != EXPIRED]
    for node in hit:
        state.last_heartbeats[node] = EXPIRED
    return pickle.dumps(state), [repr(n) for n in hit]


def evict(host: str, port: int, run_id: str, *, pids: set[int] | None = None, addr: str | None = None,
          attempts: int = 20, timeout_s: float = 5.0) -> list[str]:
    """Expire the heartbeats of the rendezvous nodes with these agent pids (or this address).

    Returns the nodes expired (empty when none matched: already gone, or not joined).
    """
    from torch.distributed import TCPStore

    if not pids and not addr:
        raise ValueError("evict needs pids or addr")

    def match(node) -> bool:
        return (pids is not None and node.pid in pids) or (addr is not None and node.addr == addr)

    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    key = state_key(run_id)
    for _ in range(attempts):
        if not store.check([key]):
            return []
        current = store.get(key)
        try:
            bits = b64decode(current)
            new_bits, hit = expire_nodes(bits, match)
        except Exception:  # the backend's "no state yet" sentinel or a format we don't know
            return []
        if not hit:
            return []
        result = store.compare_set(key, current, b64encode(new_bits))
        if result == b64encode(new_bits):
            return hit
    raise RuntimeError(f"rendezvous state of {run_id} kept changing; gave up after {attempts} attempts")


def read_state(host: str, port: int, run_id: str, timeout_s: float = 5.0):
    """The rendezvous state as torch keeps it (participants, wait and redundancy lists), or None."""
    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    key = state_key(run_id)
    if not store.check([key]):
        return None
    try:
        return pickle.loads(b64decode(store.get(key)))
    except Exception:  # the backend's "no state yet" sentinel
        return None
