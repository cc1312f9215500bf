"""The failover controller on Kubernetes: replicas that elect one leader through a Lease.

Only the controller acts on the cluster (the agents report): its ClusterRole is what
quarantine needs, and no more: read, watch and patch nodes (cordon, taints, annotations),
patch node status (the AidcGpuHealthy condition), list pods and create evictions (drain),
create Events. The Lease it elects its leader with is granted by a Role in its own namespace
only. Replicas spread across nodes, so losing one node never takes every replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_kubernetes.apps.v1 import Deployment
from pulumi_kubernetes.apiextensions import CustomResource
from pulumi_kubernetes.core.v1 import ConfigMap, Namespace, Service, ServiceAccount
from pulumi_kubernetes.rbac.v1 import ClusterRole, ClusterRoleBinding, Role, RoleBinding

from aidc.probes import DEFAULT_STALL_AFTER_S
from aidc.spec import ClusterSpec
from aidc_infra.agent import CONFIG_DIR, MONITORING_API, STATE_DIR, probes, scrape_interval, stack_document
from aidc_infra.common import AGENT_NAMESPACE, PKG, managed_labels

APP = "aidc-failover-controller"
CLUSTER_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
# kubernetes.gpu_allocation: dra only: one GPU out is a DeviceTaintRule (aidc.failover.k8s_devices).
DRA_RULES = [{"apiGroups": ["resource.k8s.io"], "resources": ["devicetaintrules"],
              "verbs": ["get", "create", "delete"]}]
LEASE_RULES = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]
RUN_AS = 10001  # the image's unprivileged user (Dockerfile)
# /metrics, /healthz and /readyz of every replica; the agent's is 9402 (aidc.spec.AGENT_METRICS_PORT).
METRICS_PORT = 9403


def stall_after_s(spec: ClusterSpec) -> float:
    """The liveness threshold: a drain may hold one loop turn for the whole eviction timeout
    (PodDisruptionBudgets' 429s retried), which is work, not a stall."""
    return DEFAULT_STALL_AFTER_S + spec.kubernetes.eviction_timeout_s


def controller_command(spec: ClusterSpec) -> list[str]:
    return ["aidc", "failover", "run", "--stack", spec.name, "--lab-dir", STATE_DIR,
            "--metrics-port", str(METRICS_PORT), "--listen-address", "0.0.0.0",
            "--stall-after", str(stall_after_s(spec))]


def pod_spec(spec: ClusterSpec, labels: dict) -> dict:
    return {
        "serviceAccountName": APP,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": labels}}}]}},
        "containers": [{
            "name": "controller",
            "image": spec.agent.image,
            "command": controller_command(spec),
            # Its own pod, which quarantine never evicts (aidc.failover.kubernetes).
            "env": [{"name": "AIDC_ROOT", "value": CONFIG_DIR},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
            "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
            # Ready: store and audit open and the loop turning, leader or standby (a standby is
            # scraped too: the alerts take the max of aidc_failover_lease_held over replicas).
            **probes("metrics"),
            "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "384Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                             {"name": "state", "mountPath": STATE_DIR}],
        }],
        "volumes": [{"name": "config", "configMap": {"name": "aidc-controller-spec"}},
                    {"name": "state", "emptyDir": {}}],
    }


@dataclass(frozen=True)
class FailoverControllerArgs:
    spec: ClusterSpec


class FailoverControllerDeployment(pulumi.ComponentResource):
    def __init__(self, name: str, args: FailoverControllerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:controller:FailoverController", name, None, opts)
        spec = args.spec
        ns = spec.kubernetes.namespace
        child = pulumi.ResourceOptions(parent=self)
        labels = {**managed_labels("controller"), "app.kubernetes.io/name": APP}
        selector = {"app.kubernetes.io/name": APP}
        deps = []
        if ns != AGENT_NAMESPACE:  # the agent's namespace exists already (Namespaces)
            deps.append(Namespace(f"{name}-namespace", metadata={"name": ns, "labels": managed_labels("controller")},
                                  opts=child))
        placed = pulumi.ResourceOptions(parent=self, depends_on=deps)
        meta = lambda n: {"name": n, "namespace": ns, "labels": labels}  # noqa: E731
        self.account = ServiceAccount(f"{name}-account", metadata=meta(APP), opts=placed)
        self.cluster_role = ClusterRole(f"{name}-role", metadata={"name": APP, "labels": labels},
                                        rules=CLUSTER_RULES + (DRA_RULES if spec.kubernetes.gpu_allocation == "dra"
                                                               else []), opts=child)
        self.cluster_binding = ClusterRoleBinding(
            f"{name}-binding", metadata={"name": APP, "labels": labels},
            role_ref={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": APP},
            subjects=[{"kind": "ServiceAccount", "name": APP, "namespace": ns}], opts=child)
        self.lease_role = Role(f"{name}-lease-role", metadata=meta(f"{APP}-lease"), rules=LEASE_RULES, opts=placed)
        self.lease_binding = RoleBinding(
            f"{name}-lease-binding", metadata=meta(f"{APP}-lease"),
            role_ref={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{APP}-lease"},
            subjects=[{"kind": "ServiceAccount", "name": APP, "namespace": ns}], opts=placed)
        self.config = ConfigMap(f"{name}-spec", metadata=meta("aidc-controller-spec"),
                                data={f"Pulumi.{spec.name}.yaml": stack_document(spec)}, opts=placed)
        self.deployment = Deployment(
            f"{name}-deployment", metadata=meta(APP),
            spec={"replicas": spec.kubernetes.controller_replicas, "selector": {"matchLabels": selector},
                  # One leader acts; a rollout replaces replicas one at a time so a leader is always near.
                  "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec(spec, selector)}},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.config, self.cluster_binding, self.lease_binding]))
        # Headless: every replica is an endpoint of its own, so the ServiceMonitor scrapes each.
        self.service = Service(
            f"{name}-service", metadata=meta(APP),
            spec={"clusterIP": "None", "selector": selector,
                  "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]},
            opts=placed)
        self.service_monitor = CustomResource(
            f"{name}-servicemonitor", api_version=MONITORING_API, kind="ServiceMonitor",
            metadata={**meta(APP), "labels": {**labels, **spec.agent.service_monitor_labels}},
            spec={"selector": {"matchLabels": selector}, "namespaceSelector": {"matchNames": [ns]},
                  "endpoints": [{"port": "metrics", "path": "/metrics", "interval": scrape_interval(spec)}]},
            opts=placed)
        self.register_outputs({"replicas": spec.kubernetes.controller_replicas})
