"""The failover controller on Kubernetes: faults arrive through the API server, the leader acts.

Each replica watches nodes and copies agents' fault conditions into its own store (so a
replica that becomes leader has every fault already), but only the replica holding the
`coordination.k8s.io` Lease decides and acts, and its backend re-checks the lease right
before every change. The blast radius is counted from the cluster (nodes aidc quarantined,
nodes not Ready), so a new leader sees what the old one did.
"""

from __future__ import annotations

import sys
import threading

from aidc.failover.controller import FailoverController
from aidc.failover.k8s_faults import KubernetesFaultSource, NodeWatch
from aidc.failover.kubernetes import POOL_LABEL, LeaderGuarded, api_client_from
from aidc.failover.leader import LeaseElector, default_identity
from aidc.failover.leases import fenced


def leader_elector(settings, api_client=None, identity: str | None = None) -> LeaseElector:
    return LeaseElector(api_client or api_client_from(settings), settings.namespace, settings.lease_name,
                        identity or default_identity(), lease_duration_s=settings.lease_duration_s,
                        renew_deadline_s=settings.renew_deadline_s, retry_period_s=settings.retry_period_s)


def run_on_kubernetes(ctl: FailoverController, stop: threading.Event, poll_s: float = 0.05,
                      api_client=None, identity: str | None = None, watch_timeout_s: int = 30) -> None:
    settings = ctl.spec.kubernetes
    api = api_client or api_client_from(settings)
    lease = leader_elector(settings, api, identity)
    if not isinstance(ctl.scheduler, LeaderGuarded):
        ctl.scheduler = LeaderGuarded(ctl.scheduler, lease)
    elected = fenced(ctl.spec, lease)  # state in PostgreSQL: each term takes a fencing token there
    source = KubernetesFaultSource(ctl.store, NodeWatch(api, timeout_s=watch_timeout_s, label_selector=POOL_LABEL),
                                   audit=ctl.audit, actor=ctl.actor)
    watcher = threading.Thread(target=source.run, args=(stop, _log_watch_error), name="node-watch", daemon=True)
    watcher.start()
    try:
        ctl.run(stop, poll_s, lease=elected)
    finally:
        # The watch may sit in a long poll; it is a daemon thread and its work is idempotent
        # (the store dedupes by key), so a stop does not wait out the poll.
        watcher.join(timeout=2)


def _log_watch_error(exc: Exception) -> None:
    print(f"aidc failover: node watch failed, retrying: {exc}", file=sys.stderr, flush=True)
