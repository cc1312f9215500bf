"""One GPU out on Kubernetes: a DRA device taint (`DeviceTaintRule`, resource.k8s.io).

With Dynamic Resource Allocation a GPU is a device that a DRA driver publishes in a
ResourceSlice (NVIDIA's driver: driver `gpu.nvidia.com`, pool = the node's name, devices
`gpu-0`, `gpu-1`, ...). A DeviceTaintRule selects one device by driver, pool and name and
taints it: the scheduler allocates it to no new claim, and with effect NoExecute the pods whose
claims hold it are evicted (their Job or controller restarts them on another device). Always
NoExecute here, whatever kubernetes.quarantine_taint_effect says for nodes: a workload left on
a GPU with a local fault keeps failing. The node is not touched; its other GPUs stay allocatable.

With the classic device plugin no API takes one named GPU out: the plugin alone reports a
device unhealthy (to the kubelet, which then gives it to no new pod, but leaves running pods on
it), and aidc cannot make it do so. So `gpu_isolation` says why, and failover quarantines the
node instead (aidc.failover.gpu_quarantine records the fallback in the decision).

DeviceTaintRule is served as resource.k8s.io/v1alpha3 from Kubernetes 1.33 (feature gate
DRADeviceTaints); tested against tests/kube/fake_apiserver.py, which validates what it
receives with the API's schema (kubernetes-validate, strict).
"""

from __future__ import annotations

import hashlib

from aidc.failover.kubernetes import GROUP, QUARANTINE_TAINT, KubernetesError, reason_code

RULE_NODE = f"{GROUP}/node"        # annotation: the node whose GPU the rule takes out
RULE_GPU = f"{GROUP}/gpu"          # label: the GPU's index
RULE_REASON = f"{GROUP}/reason"    # annotation: why (the decision's reason)
MANAGED_LABEL = f"{GROUP}/quarantine"
DEVICE_TAINT_EFFECT = "NoExecute"


def rule_name(node: str, gpu: int) -> str:
    """`aidc-<node>-gpu<N>`, a DNS subdomain; a node name too long for it is shortened with a hash."""
    name = f"aidc-{node}-gpu{int(gpu)}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:12]
    return f"aidc-{node[:200].rstrip('.-')}-{digest}-gpu{int(gpu)}"


class DeviceTaints:
    def __init__(self, api_client, settings):
        from kubernetes import client

        self._client = client
        self.api = client.ResourceV1alpha3Api(api_client)
        self.settings = settings

    def isolation(self, node: str) -> str | None:
        if self.settings.gpu_allocation == "dra":
            return None
        return ("the classic device plugin (kubernetes.gpu_allocation: device_plugin) gives no API to take one GPU "
                "out: only the plugin marks a GPU unhealthy, and only for new pods")

    def body(self, node: str, gpu: int, reason: str, event: str | None) -> dict:
        return {
            "apiVersion": "resource.k8s.io/v1alpha3", "kind": "DeviceTaintRule",
            "metadata": {"name": rule_name(node, gpu), "labels": {MANAGED_LABEL: "gpu", RULE_GPU: str(int(gpu))},
                         "annotations": {RULE_NODE: node, RULE_REASON: reason[:1024],
                                         **({f"{GROUP}/event": event} if event else {})}},
            "spec": {"deviceSelector": {"driver": self.settings.dra_driver, "pool": node,
                                        "device": self.settings.dra_device_name.format(index=int(gpu))},
                     "taint": {"key": QUARANTINE_TAINT, "value": reason_code(reason),
                               "effect": DEVICE_TAINT_EFFECT}},
        }

    def taint(self, node: str, gpu: int, reason: str, event: str | None = None) -> str | None:
        """Create the rule (idempotent: one that exists already is kept)."""
        try:
            self.api.create_device_taint_rule(self.body(node, gpu, reason, event))
        except self._client.ApiException as exc:
            if exc.status != 409:
                raise KubernetesError(f"create DeviceTaintRule {rule_name(node, gpu)}: {exc.status} "
                                      f"{exc.reason}") from None
        return None

    def untaint(self, node: str, gpu: int) -> str | None:
        """Delete the rule (idempotent: one already gone is said, not raised)."""
        try:
            # The body (the deleted object, or a Status, by server) is not needed: not parsed.
            self.api.delete_device_taint_rule(rule_name(node, gpu), _preload_content=False)
        except self._client.ApiException as exc:
            if exc.status == 404:
                return f"DeviceTaintRule {rule_name(node, gpu)} was already gone"
            raise KubernetesError(f"delete DeviceTaintRule {rule_name(node, gpu)}: {exc.status} "
                                  f"{exc.reason}") from None
        return None

    def tainted(self, node: str, gpu: int) -> bool:
        try:
            self.api.read_device_taint_rule(rule_name(node, gpu))
        except self._client.ApiException as exc:
            if exc.status == 404:
                return False
            raise KubernetesError(f"read DeviceTaintRule {rule_name(node, gpu)}: {exc.status} {exc.reason}") from None
        return True
