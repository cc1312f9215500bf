"""aidc's mandatory policies as plain functions: (resource_type, props, name) -> violation messages.

props are a resource's inputs as the Pulumi engine sends them (Kubernetes field names). The
pack (`__main__.py`) wraps these for pulumi-policy; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

MAX_ROTATION_DAYS = 90
GPU_TAINT_KEY = "nvidia.com/gpu"
WORKLOAD_KINDS = {"Pod", "DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job", "CronJob"}
ALLOWLIST_FILE = Path(__file__).resolve().parent / "privileged-allowlist.yaml"

Validator = Callable[[str, Mapping[str, Any], str], list[str]]


def _kind(resource_type: str) -> str:
    return resource_type.rsplit(":", 1)[-1]


def _labels(props: Mapping) -> Mapping:
    return (props.get("metadata") or {}).get("labels") or {}


def kms_rotation_at_most_90_days(resource_type: str, props: Mapping, name: str) -> list[str]:
    """The key reference (ConfigMap labelled aidc.dev/kms=key-reference) must rotate within 90 days."""
    if _kind(resource_type) != "ConfigMap" or _labels(props).get("aidc.dev/kms") != "key-reference":
        return []
    raw = (props.get("data") or {}).get("rotation_days")
    try:
        days = int(raw)
    except (TypeError, ValueError):
        return [f"{name}: KMS key reference has no integer rotation_days (got {raw!r}); "
                f"set aidc:cluster.kms.rotation_days to at most {MAX_ROTATION_DAYS}"]
    if not 1 <= days <= MAX_ROTATION_DAYS:
        return [f"{name}: KMS key rotation every {days} days exceeds the {MAX_ROTATION_DAYS}-day maximum; "
                f"set aidc:cluster.kms.rotation_days to at most {MAX_ROTATION_DAYS}"]
    return []


def _pool_template(resource_type: str, props: Mapping) -> tuple[Mapping, list] | None:
    spec = props.get("spec") or {}
    template = spec.get("template") or {}
    if resource_type.startswith("kubernetes:karpenter.sh/") and _kind(resource_type) == "NodePool":
        return (template.get("metadata") or {}).get("labels") or {}, (template.get("spec") or {}).get("taints") or []
    if resource_type.startswith("kubernetes:cluster.x-k8s.io/") and _kind(resource_type) == "MachineDeployment":
        return (template.get("metadata") or {}).get("labels") or {}, (template.get("spec") or {}).get("taints") or []
    return None


def gpu_pools_tainted(resource_type: str, props: Mapping, name: str) -> list[str]:
    """Every GPU node pool taints its nodes nvidia.com/gpu:NoSchedule."""
    found = _pool_template(resource_type, props)
    if found is None:
        return []
    labels, taints = found
    if "aidc.dev/gpu-model" not in labels:
        return []
    if any(t.get("key") == GPU_TAINT_KEY and t.get("effect") == "NoSchedule" for t in taints):
        return []
    return [f"{name}: GPU node pool ({labels['aidc.dev/gpu-model']}) lacks the taint "
            f"{GPU_TAINT_KEY}:NoSchedule, so any pod could land on its GPUs"]


def checkpoint_storage_retained(resource_type: str, props: Mapping, name: str) -> list[str]:
    """The checkpoint StorageClass reclaims with Retain: deleting a claim must not delete checkpoints."""
    if _kind(resource_type) != "StorageClass" or _labels(props).get("aidc.dev/volume") != "checkpoints":
        return []
    policy = props.get("reclaimPolicy") or "Delete"  # Kubernetes' default
    if policy != "Retain":
        return [f"{name}: checkpoint StorageClass reclaims with {policy}; checkpoints need Retain"]
    return []


def rbac_without_wildcards(resource_type: str, props: Mapping, name: str) -> list[str]:
    """No Role or ClusterRole grants '*' verbs, resources or API groups."""
    if _kind(resource_type) not in ("Role", "ClusterRole") or "rbac.authorization.k8s.io" not in resource_type:
        return []
    out = []
    for i, rule in enumerate(props.get("rules") or []):
        for field in ("verbs", "resources", "apiGroups"):
            if "*" in (rule.get(field) or []):
                out.append(f"{name}: rule {i} grants wildcard {field} ('*'); list exactly what is needed")
    return out


def _pod_spec(kind: str, props: Mapping) -> Mapping:
    spec = props.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    return ((spec.get("template") or {}).get("spec")) or {}


def load_allowlist(path: Path = ALLOWLIST_FILE) -> dict[str, str]:
    return dict(yaml.safe_load(path.read_text())["allow"])


def no_privileged_containers(resource_type: str, props: Mapping, name: str,
                             allowlist: Mapping[str, str] | None = None) -> list[str]:
    """No privileged container unless <namespace>/<Kind>/<name>/<container> is on the allow-list."""
    kind = _kind(resource_type)
    if kind not in WORKLOAD_KINDS:
        return []
    allow = load_allowlist() if allowlist is None else allowlist
    meta = props.get("metadata") or {}
    pod = _pod_spec(kind, props)
    out = []
    for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        if not (container.get("securityContext") or {}).get("privileged"):
            continue
        key = f"{meta.get('namespace', 'default')}/{kind}/{meta.get('name', name)}/{container.get('name')}"
        if key not in allow:
            out.append(f"{name}: container {key} runs privileged and is not on the allow-list "
                       f"(policy/privileged-allowlist.yaml)")
    return out


POLICIES: dict[str, tuple[str, Validator]] = {
    "kms-rotation-at-most-90-days": ("KMS keys rotate at least every 90 days", kms_rotation_at_most_90_days),
    "gpu-pools-tainted": ("Every GPU node pool is tainted nvidia.com/gpu:NoSchedule", gpu_pools_tainted),
    "checkpoint-storage-retain": ("Checkpoint storage reclaims with Retain", checkpoint_storage_retained),
    "rbac-no-wildcards": ("RBAC rules list verbs, resources and API groups explicitly", rbac_without_wildcards),
    "no-privileged-containers": ("No privileged containers except the allow-list", no_privileged_containers),
}


def violations(resources: list[tuple[str, Mapping, str]]) -> dict[str, list[str]]:
    """Run every policy over (type, props, name) triples; {policy name: messages} for those violated."""
    out: dict[str, list[str]] = {}
    for policy, (_, check) in POLICIES.items():
        found = [m for t, p, n in resources for m in check(t, p, n)]
        if found:
            out[policy] = found
    return out
