"""Publish a node's faults where Kubernetes users look for them (node-problem-detector's contract).

Each fault sets the node condition `AidcGpuHealthy=False` through the status subresource and
creates a Warning Event about the node; `kubectl describe node` shows both. The agent's RBAC
allows exactly these two writes (nodes/status patch, events create). Publishing is idempotent:
the Event's name derives from the fault's key, so a retried publish finds it exists (409).
"""

from __future__ import annotations

import hashlib
import socket
import time

from aidc.errors import AidcError
from aidc.events import FaultEvent
from aidc.failover.k8s_faults import condition_reason, fault_condition


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
