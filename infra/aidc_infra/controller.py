"""The failover controller on Kubernetes: replicas that elect one leader through a Lease.

Only the controller acts on the cluster (the agents report): its ClusterRole is what
quarantine needs, and no more: read, watch and patch nodes (cordon, taints, annotations),
patch node status (the AidcGpuHealthy condition), list pods and create evictions (drain),
create Events. The Lease it elects its leader with is granted by a Role in its own namespace
only. Replicas spread across nodes, so losing one node never takes every replica.

Where it keeps its state follows the stack's `state:`. SQLite: a file in the pod's emptyDir,
lost with the pod (a replaced pod forgets a latched breaker). PostgreSQL: no state volume at
all; each pod reads the DSN from a Secret as $state.dsn_env (kubernetes.state_secret, or the
`<name>-app` Secret of the CloudNativePG `Cluster` made here when kubernetes.cloudnative_pg asks),
and events, intents, the breaker latch and the remediation history live in the database. The
pod keeps only a small in-memory scratch directory for per-pod files (the installation record it
derives from its ConfigMap; the audit log until it moves to the state database).
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
SCRATCH_DIR = "/run/aidc"  # --state-dir of a controller whose state is in PostgreSQL
CNPG_API = "postgresql.cnpg.io/v1"
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
    state_dir = SCRATCH_DIR if spec.state.backend == "postgres" else STATE_DIR
    return ["aidc", "failover", "run", "--stack", spec.name, "--state-dir", state_dir,
            "--listen-address", f"0.0.0.0:{METRICS_PORT}",
            "--stall-after", str(stall_after_s(spec))]


def dsn_secret(spec: ClusterSpec) -> tuple[str, str] | None:
    """(Secret name, key) the controller pods read the state DSN from; None when the stack gives
    no DSN through the environment (SQLite, or a DSN without a password written in the stack)."""
    if spec.state.backend != "postgres" or not spec.state.dsn_env:
        return None
    cnpg = spec.kubernetes.cloudnative_pg
    if cnpg is not None:
        return f"{cnpg.name}-app", "uri"  # what the CloudNativePG operator writes for the app user
    return spec.kubernetes.state_secret, spec.kubernetes.state_secret_key


def state_storage(spec: ClusterSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(env, volumeMounts, volumes) for where the controller keeps its state."""
    if spec.state.backend == "sqlite":
        return [], [{"name": "state", "mountPath": STATE_DIR}], [{"name": "state", "emptyDir": {}}]
    env = []
    secret = dsn_secret(spec)
    if secret is not None:
        env.append({"name": spec.state.dsn_env,
                    "valueFrom": {"secretKeyRef": {"name": secret[0], "key": secret[1]}}})
    return (env, [{"name": "scratch", "mountPath": SCRATCH_DIR}],
            [{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}])


def cloudnative_pg_cluster(spec: ClusterSpec) -> dict:
    """The CloudNativePG Cluster's spec: a database `aidc` owned by `aidc` (the app Secret's user)."""
    cnpg = spec.kubernetes.cloudnative_pg
    storage = {"size": cnpg.storage_size, **({"storageClass": cnpg.storage_class} if cnpg.storage_class else {})}
    return {"instances": cnpg.instances, **({"imageName": cnpg.image} if cnpg.image else {}),
            "storage": storage, "bootstrap": {"initdb": {"database": "aidc", "owner": "aidc"}},
            "enableSuperuserAccess": False}


def pod_spec(spec: ClusterSpec, labels: dict) -> dict:
    state_env, state_mounts, state_volumes = state_storage(spec)
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
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    *state_env],
            "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
            # Ready: store and audit open and the loop turning, leader or standby (a standby is
            # scraped too: the alerts take the max of aidc_failover_lease_held over replicas).
            **probes("metrics"),
            "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "384Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, *state_mounts],
        }],
        "volumes": [{"name": "config", "configMap": {"name": "aidc-controller-spec"}}, *state_volumes],
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
        self.state_database = None
        if spec.kubernetes.cloudnative_pg is not None:
            self.state_database = CustomResource(
                f"{name}-state-database", api_version=CNPG_API, kind="Cluster",
                metadata=meta(spec.kubernetes.cloudnative_pg.name), spec=cloudnative_pg_cluster(spec), opts=placed)
        self.deployment = Deployment(
            f"{name}-deployment", metadata=meta(APP),
            spec={"replicas": spec.kubernetes.controller_replicas, "selector": {"matchLabels": selector},
                  # One leader acts; a rollout replaces replicas one at a time so a leader is always near.
                  "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec(spec, selector)}},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.config, self.cluster_binding, self.lease_binding,
                                                                 *([self.state_database] if self.state_database else [])]))
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
