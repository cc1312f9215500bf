"""Leader election on a `coordination.k8s.io/v1` Lease, so two controller replicas never both act.

The rules are client-go's: the holder renews the Lease every `retry_period_s`; another
replica takes it over only after it has seen the same renewTime for `lease_duration_s` on its
*own* clock (clocks of different hosts are never compared); every write carries the
resourceVersion that was read, so two replicas racing for an expired Lease cannot both win
(one gets 409). A leader that could not renew within `renew_deadline_s` stops considering
itself leader at once, before the Lease expires for the others: `renew_deadline_s <
lease_duration_s` leaves a gap in which nobody acts rather than one in which two do.

The Lease is read as raw JSON, not through the client's models: a field that does not parse
(a garbage renewTime or duration, no spec) must not stop the election. Expiry is this replica's
own `lease_duration_s` of seeing (holderIdentity, renewTime) unchanged, whatever the object
says its duration is, so a Lease written with a duration of years cannot stop failover either.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from aidc.errors import AidcError


class NotLeader(AidcError):
    """This replica does not hold the lease; it must not act."""

    exit_code = 3


def default_identity() -> str:
    import os

    return f"{socket.gethostname()}_{os.getpid()}"


class LeaseElector:
    def __init__(self, api_client, namespace: str, name: str, identity: str, lease_duration_s: int = 15,
                 renew_deadline_s: float = 10, retry_period_s: float = 2,
                 clock: Callable[[], float] = time.monotonic):
        from kubernetes import client

        self._client = client
        self.coord = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = \
            lease_duration_s, renew_deadline_s, retry_period_s
        self._clock = clock
        self._renewed_at: float | None = None  # our clock, when our last renew succeeded
        self._observed: tuple[str | None, str | None] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self.transitions_seen = 0
        self._last_try: float | None = None
        self._lock = threading.Lock()

    # -- the question every action asks --------------------------------------------------
    def is_leader(self) -> bool:
        with self._lock:
            return self._renewed_at is not None and self._clock() - self._renewed_at < self.renew_deadline_s

    def check(self) -> None:
        if not self.is_leader():
            raise NotLeader(f"{self.identity} does not hold lease {self.namespace}/{self.name}")

    # -- the controller's lease interface (as aidc.failover.lease.Lease) ------------------------
    def hold(self) -> bool:
        """Acquire or renew at most every retry period (the controller asks on every poll)."""
        if self._last_try is None or self._clock() - self._last_try >= self.retry_period_s:
            self._last_try = self._clock()
            return self.try_acquire_or_renew()
        return self.is_leader()

    def held(self) -> bool:
        return self.is_leader()

    def describe(self) -> dict:
        return {"holder": self.identity, "lease": f"{self.namespace}/{self.name}",
                "lease_duration_s": self.lease_duration_s, "renew_deadline_s": self.renew_deadline_s}

    # -- one round -----------------------------------------------------------------------------
    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the lease afterwards."""
        now = self._clock()
        try:
            lease = self._read()
        except self._client.ApiException as exc:
            if exc.status != 404:
                return self._failed()
            return self._write(None, transitions=0)
        except Exception:  # unreachable API server: keep the lease only until the renew deadline
            return self._failed()
        spec = lease.get("spec") if isinstance(lease.get("spec"), dict) else {}
        holder = _text(spec.get("holderIdentity"))
        renew = _text(spec.get("renewTime"))  # compared as written, never parsed
        transitions = spec.get("leaseTransitions")
        transitions = transitions if type(transitions) is int and transitions >= 0 else 0
        if (holder, renew) != self._observed:
            self._observed, self._observed_at = (holder, renew), now
        if holder == self.identity:
            return self._write(lease, transitions=transitions, acquired=_time(spec.get("acquireTime")))
        expired = not holder or now - self._observed_at >= self.lease_duration_s
        if not expired:
            return self._failed(lost=True)
        return self._write(lease, transitions=transitions + 1)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.try_acquire_or_renew()
            stop.wait(self.retry_period_s)
        self.release()

    def start(self) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="lease-elector", daemon=True)
        thread.start()
        return thread, stop

    def release(self) -> None:
        """On a clean stop, give the lease up so the other replica need not wait for expiry."""
        if not self.is_leader():
            return
        try:
            lease = self._read()
            spec = lease.get("spec")
            if isinstance(spec, dict) and spec.get("holderIdentity") == self.identity:
                spec.pop("holderIdentity")
                spec.pop("renewTime", None)
                self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        except (self._client.ApiException, ValueError):
            pass
        with self._lock:
            self._renewed_at = None

    # -- internals -------------------------------------------------------------------------------
    def _read(self) -> dict:
        """The Lease as the API server sent it (JSON), so no field of it can fail to deserialize."""
        response = self.coord.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
        lease = json.loads(response.data)
        if not isinstance(lease, dict) or not isinstance(lease.get("metadata"), dict):
            raise ValueError("the Lease is not an object with metadata")
        return lease

    def _write(self, lease: dict | None, transitions: int, acquired: datetime | None = None) -> bool:
        c = self._client
        now = datetime.now(timezone.utc)
        spec = c.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_duration_s,
                             acquire_time=acquired or now, renew_time=now, lease_transitions=transitions)
        started = self._clock()
        try:
            if lease is None:
                body = c.V1Lease(metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=spec)
                self.coord.create_namespaced_lease(self.namespace, body)
            else:
                # metadata keeps the resourceVersion we read: a race is a 409
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": lease["metadata"],
                        "spec": spec}
                self.coord.replace_namespaced_lease(self.name, self.namespace, body)
        except c.ApiException:
            return self._failed(lost=True)
        except Exception:  # unreachable API server: keep the lease only until the renew deadline
            return self._failed()
        with self._lock:
            if self._renewed_at is None:
                self.transitions_seen += 1
            self._renewed_at = started  # counted from before the write: never longer than we may
        return True

    def _failed(self, lost: bool = False) -> bool:
        with self._lock:
            if lost:
                self._renewed_at = None
        return self.is_leader()


def _text(value) -> str | None:
    """A Lease field that should be a string; anything else counts as absent."""
    return value if isinstance(value, str) and value else None


def _time(value) -> datetime | None:
    """A Lease timestamp written back as it was, or None when it is not one (then it is reset)."""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return None
