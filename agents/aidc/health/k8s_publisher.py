"""Publish a node's faults where Kubernetes users look for them (node-problem-detector's contract).

Each fault sets the node condition `AidcGpuHealthy=False` through the status subresource and
creates a Warning Event about the node; `kubectl describe node` shows both. The agent's RBAC
allows exactly these two writes (nodes/status patch, events create), and an admission policy
limits both to the node its token names (infra/aidc_infra/agent_binding.py). Publishing is idempotent:
the Event's name derives from the fault's key, so a retried publish finds it exists (409).
"""

from __future__ import annotations

import hashlib
import socket
import time

from aidc.errors import AidcError
from aidc.events import FaultEvent
from aidc.failover.k8s_faults import condition_reason, fault_condition
from aidc.transport.forwarder import OutboxForwarder, TransportError


class PublishError(AidcError):
    """The API server did not take the fault; the caller keeps it and retries."""

    exit_code = 1


class NodeFaultPublisher:
    def __init__(self, api_client, node: str, events_namespace: str = "default", component: str = "aidc-agent"):
        from kubernetes import client

        self._client = client
        self.core = client.CoreV1Api(api_client)
        self.node, self.events_namespace, self.component = node, events_namespace, component

    def publish(self, key: str, event: FaultEvent) -> None:
        c = self._client
        try:
            self.core.patch_node_status(self.node, {"status": {"conditions": [fault_condition(event, key)]}})
        except c.ApiException as exc:
            raise PublishError(f"setting the fault condition on {self.node}: {exc.status} {exc.reason}") from None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.observed_at))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{self.node}.aidc-{digest}", "namespace": self.events_namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": self.node},
                "reason": condition_reason(event), "message": event.message[:1024], "type": "Warning",
                "source": {"component": self.component, "host": socket.gethostname()},
                "firstTimestamp": when, "lastTimestamp": when, "count": 1}
        try:
            self.core.create_namespaced_event(self.events_namespace, body)
        except c.ApiException as exc:
            if exc.status != 409:  # 409: published before (a retry after a lost answer)
                raise PublishError(f"creating the Event for {self.node}: {exc.status} {exc.reason}") from None


class KubernetesForwarder(OutboxForwarder):
    """Drain this node's outbox (the agent's store) into the API server: each fault a condition
    and an Event, marked forwarded once the API server took it. The loop, backoff and restart
    behaviour are the HTTPS forwarder's (aidc.transport.forwarder); only the sink differs. No URL
    or TLS here: the client's own credentials (the pod's service account) reach the API."""

    sink = "API server"

    def __init__(self, store_path, node: str, publisher: NodeFaultPublisher, *, batch_size: int = 20, **loop):
        super().__init__(store_path, node, batch_size=batch_size, **loop)
        self.publisher = publisher

    def forward_once(self, store) -> int:
        rows = store.unforwarded(self.node, self.batch_size)
        for event_id, key, event in rows:
            try:
                self.publisher.publish(key, event)
            except PublishError as exc:
                raise TransportError(str(exc)) from None
            except Exception as exc:  # the API server unreachable (urllib3's errors)
                raise TransportError(f"API server unreachable: {type(exc).__name__}: {exc}") from None
            store.mark_forwarded([event_id])  # one at a time: a failure mid-batch repeats nothing
            self.forwarded += 1
        return len(rows)
