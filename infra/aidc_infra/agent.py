"""The aidc node agent on every GPU node: DaemonSet, least-privilege RBAC, Service, monitoring.

The agent detects and reports; it never acts on the cluster. Its RBAC is exactly what
reporting needs, as node-problem-detector's: patch its node's status (the AidcGpuHealthy
condition) and create Events; RBAC cannot name "its node", so an admission policy binds each
agent to the node its token names (agent_binding.py). Quarantine belongs to the failover
controller (controller.py). The policy pack rejects wildcards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pulumi
import yaml
from pulumi_kubernetes.admissionregistration.v1 import ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding
from pulumi_kubernetes.apiextensions import CustomResource
from pulumi_kubernetes.apps.v1 import DaemonSet
from pulumi_kubernetes.core.v1 import ConfigMap, Service, ServiceAccount
from pulumi_kubernetes.rbac.v1 import ClusterRole, ClusterRoleBinding

from aidc.errors import AidcError
from aidc.spec import CONFIG_KEY, ClusterSpec
from aidc_infra import agent_binding
from aidc_infra.common import AGENT_NAMESPACE, GPU_TAINT, LABEL_DOMAIN, PKG, SPARE_TAINT, managed_labels

MONITORING_API = "monitoring.coreos.com/v1"  # pinned: prometheus-operator v0.93.0
APP = "aidc-agent"
CONTAINER = "agent"
CONFIG_DIR = "/etc/aidc"


def probes(port: str) -> dict:
    """Liveness on /healthz (the main loop turned within --stall-after, 30 s), readiness on
    /readyz (aidc.probes), both on the named metrics port."""
    return {"livenessProbe": {"httpGet": {"path": "/healthz", "port": port}, "initialDelaySeconds": 10,
                              "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": port}, "periodSeconds": 10,
                               "timeoutSeconds": 5, "failureThreshold": 1}}


def agent_command(spec) -> list[str]:
    """`aidc agent run` with the flags this spec implies; $(VAR) is expanded by the kubelet."""
    a = spec.agent
    return [*a.command, "--node", "$(AIDC_NODE)", "--backend", spec.device_backend,
            "--state-dir", STATE_DIR, "--listen-address", f"0.0.0.0:{a.metrics_port}",
            "--poll-interval", str(a.poll_interval_s),
            "--device-timeout", str(a.device_timeout_s), "--kernel-log", a.kernel_log,
            "--dcgm-exporter", a.dcgm_exporter,
            # On Kubernetes the agent reports through the API (node condition + Events).
            *(["--kubernetes"] if spec.scheduler == "kubernetes" else [])]
STATE_DIR = "/var/lib/aidc"
RULES = [
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
# Prometheus' own label for the node a scraped pod runs on, copied to dcgm-exporter's `Hostname`.
HOSTNAME_RELABELING = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "Hostname",
                       "action": "replace"}


def load_alert_rules(path: Path) -> dict | None:
    """The agent's Prometheus rule file as a PrometheusRule spec; None when there is no file."""
    if not path.exists():
        return None
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AidcError(f"{path}: expected a Prometheus rule file (YAML): {exc}") from None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        raise AidcError(f"{path}: expected a Prometheus rule file with a non-empty 'groups' list")
    return {"groups": groups}


def stack_document(spec: ClusterSpec) -> str:
    """The agent reads the very spec Pulumi deployed, as a stack file under its config dir."""
    return yaml.safe_dump({"config": {CONFIG_KEY: spec.model_dump(mode="json")}}, sort_keys=False)


def scrape_interval(spec: ClusterSpec) -> str:
    # Never scrape faster than 15 s (Prometheus load across the fleet), nor slower than the agent polls.
    return f"{max(15, math.ceil(spec.agent.poll_interval_s))}s"


def needs_privilege(spec: ClusterSpec) -> bool:
    # Reading /dev/kmsg needs the device; a plain file (journald export, the lab) does not.
    return spec.agent.kernel_log.startswith("/dev/")


def pod_spec(spec: ClusterSpec) -> dict:
    kernel_log = spec.agent.kernel_log
    volumes = [{"name": "config", "configMap": {"name": "aidc-cluster-spec"}},
               {"name": "state", "hostPath": {"path": STATE_DIR, "type": "DirectoryOrCreate"}}]
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "state", "mountPath": STATE_DIR}]
    if kernel_log.startswith("/"):  # relative paths live under the state dir (the lab)
        volumes.append({"name": "kernel-log", "hostPath": {
            "path": kernel_log, "type": "CharDevice" if needs_privilege(spec) else "File"}})
        mounts.append({"name": "kernel-log", "mountPath": kernel_log, "readOnly": True})
    if needs_privilege(spec):
        security = {"privileged": True, "readOnlyRootFilesystem": True}
    else:
        security = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]}}
    env = [
        {"name": "AIDC_ROOT", "value": CONFIG_DIR},
        {"name": "AIDC_STACK", "value": spec.name},
        {"name": "AIDC_STATE_DIR", "value": STATE_DIR},
        {"name": "AIDC_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "AIDC_KMS_KEY_ID", "valueFrom": {"configMapKeyRef": {"name": "aidc-kms", "key": "key_id"}}},
    ]
    body = {
        "serviceAccountName": APP,
        # The agent reads the kernel log (/dev/kmsg needs root and CAP_SYSLOG under
        # dmesg_restrict) and keeps its store and audit log in a root-owned hostPath directory
        # that outlives the pod: it runs as root, unlike the image's default user (10001),
        # which the failover controller keeps.
        "securityContext": {"runAsUser": 0, "runAsGroup": 0},
        "priorityClassName": "system-node-critical",
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": f"{LABEL_DOMAIN}/pool", "operator": "Exists"}]}]}}},
        "tolerations": [
            {"key": GPU_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"},
            {"key": SPARE_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"},
            # The agent must stay on a node it (or anyone) quarantined with a NoExecute taint:
            # it is the one that sees the node recover.
            {"operator": "Exists", "effect": "NoExecute"},
        ],
        "containers": [{
            "name": CONTAINER,
            "image": spec.agent.image,
            "command": agent_command(spec),
            "env": env,
            "ports": [{"name": "metrics", "containerPort": spec.agent.metrics_port, "protocol": "TCP"}],
            **probes("metrics"),
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
            "securityContext": security,
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if spec.device_backend == "nvml":
        # NVML through the NVIDIA container runtime; all GPUs visible for monitoring without
        # requesting (and so taking away) nvidia.com/gpu resources from training pods.
        body["runtimeClassName"] = "nvidia"
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
    return body


@dataclass(frozen=True)
class NodeAgentArgs:
    spec: ClusterSpec
    alert_rules: Path | None = None
    namespace: pulumi.Input[str] = AGENT_NAMESPACE


class NodeAgent(pulumi.ComponentResource):
    def __init__(self, name: str, args: NodeAgentArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:agent:NodeAgent", name, None, opts)
        spec, ns = args.spec, args.namespace
        child = pulumi.ResourceOptions(parent=self)
        labels = {**managed_labels("agent"), "app.kubernetes.io/name": APP}
        selector = {"app.kubernetes.io/name": APP}
        meta = lambda n: {"name": n, "namespace": ns, "labels": labels}  # noqa: E731
        self.account = ServiceAccount(f"{name}-account", metadata=meta(APP), opts=child)
        self.role = ClusterRole(f"{name}-role", metadata={"name": APP, "labels": labels}, rules=RULES, opts=child)
        self.binding = ClusterRoleBinding(
            f"{name}-binding", metadata={"name": APP, "labels": labels},
            role_ref={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": APP},
            subjects=[{"kind": "ServiceAccount", "name": APP, "namespace": ns}], opts=child)
        self.own_node_policy = ValidatingAdmissionPolicy(
            f"{name}-own-node", metadata={"name": agent_binding.POLICY_NAME, "labels": labels},
            spec=pulumi.Output.from_input(ns).apply(lambda n: agent_binding.policy_spec(APP, n)), opts=child)
        self.own_node_binding = ValidatingAdmissionPolicyBinding(
            f"{name}-own-node-binding", metadata={"name": agent_binding.POLICY_NAME, "labels": labels},
            spec=agent_binding.binding_spec(), opts=pulumi.ResourceOptions(parent=self,
                                                                           depends_on=[self.own_node_policy]))
        self.config = ConfigMap(f"{name}-spec", metadata=meta("aidc-cluster-spec"),
                                data={f"Pulumi.{spec.name}.yaml": stack_document(spec)}, opts=child)
        self.daemonset = DaemonSet(
            f"{name}-daemonset", metadata=meta(APP),
            spec={"selector": {"matchLabels": selector},
                  "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec(spec)}},
            # The agents start only once they are bound to their nodes.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.config, self.binding, self.own_node_binding]))
        self.service = Service(
            f"{name}-service", metadata=meta(APP),
            spec={"clusterIP": "None", "selector": selector,
                  "ports": [{"name": "metrics", "port": spec.agent.metrics_port, "targetPort": "metrics"}]},
            opts=child)
        self.service_monitor = CustomResource(
            f"{name}-servicemonitor", api_version=MONITORING_API, kind="ServiceMonitor",
            metadata={**meta(APP), "labels": {**labels, **spec.agent.service_monitor_labels}},
            spec={"selector": {"matchLabels": selector}, "namespaceSelector": {"matchNames": [ns]},
                  "endpoints": [{"port": "metrics", "interval": scrape_interval(spec),
                                 "relabelings": [HOSTNAME_RELABELING]}]},
            opts=child)
        rules = load_alert_rules(args.alert_rules) if args.alert_rules else None
        self.alert_rules = None if rules is None else CustomResource(
            f"{name}-alerts", api_version=MONITORING_API, kind="PrometheusRule", metadata=meta("aidc-agent-alerts"),
            spec=rules, opts=child)
        self.register_outputs({"privileged": needs_privilege(spec)})
