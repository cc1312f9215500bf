"""The Kubernetes scheduler backend: cordon, taint, condition, evict, and promote a spare.

Quarantine does, in this order, each step idempotent:
1. one node patch (carrying the resourceVersion it read, so a concurrent change is a 409 that
   is re-read and retried, never overwritten): `spec.unschedulable`, the taint
   `aidc.dev/quarantine=<reason code>:<effect>`, and the annotation `aidc.dev/quarantine`
   recording what aidc changed (did it cordon? did it add the taint?) so release undoes
   exactly that and nothing an operator did;
2. the node condition `AidcGpuHealthy=False` through the status subresource, as
   node-problem-detector reports problems;
3. eviction of the node's pods through the Eviction API, skipping what `kubectl drain
   --ignore-daemonsets` skips (mirror pods, DaemonSet pods), pods that have finished (they hold
   nothing) and, stricter than kubectl, pods of priority class system-node-critical or
   system-cluster-critical (or priority >= 2000000000), pods in kube-system and the controller's
   own pod (POD_NAMESPACE/POD_NAME, from the downward API). As with `--force
   --delete-emptydir-data`, unmanaged pods and pods with emptyDir volumes are evicted. A
   PodDisruptionBudget refusal (429) is retried with backoff up to `eviction_timeout_s`, then
   reported as a warning: the node is out of service either way;
4. with `promote_spares`, the spare taint comes off one healthy spare, which is annotated with
   the node it stands in for, and goes back on when that node is released.

Every node write names the field manager `aidc`, so the API server records which fields aidc
set (`metadata.managedFields`). Release lifts a cordon only when aidc's record says aidc
cordoned the node *and* the server still names aidc as the manager of `spec.unschedulable`: an
operator who cordons after aidc (an uncordon and a cordon, any change of the field) owns it, and
the cordon stays. `kubectl cordon` of a node that is cordoned already sends nothing and leaves no
trace; an operator keeps such a node out with a taint of their own, which aidc never removes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from aidc.errors import AidcError
from aidc.retry import Backoff, RetryPolicy

GROUP = "aidc.dev"
QUARANTINE_TAINT = f"{GROUP}/quarantine"
SPARE_TAINT = f"{GROUP}/spare"
RECORD = f"{GROUP}/quarantine"          # node annotation: what aidc changed, as JSON
PROMOTED_FOR = f"{GROUP}/promoted-for"  # spare annotation: the quarantined node it replaces
CONDITION = "AidcGpuHealthy"
POOL_LABEL = f"{GROUP}/pool"                # set on every node of aidc's node pools (infra/)
CONFLICT_RETRIES = 8
# Evictions a PodDisruptionBudget refused (429) are tried again, waiting 0.5 s doubling to 8 s,
# until settings.eviction_timeout_s.
EVICTION_RETRY = RetryPolicy(attempts=None, base_s=0.5, cap_s=8.0)
FIELD_MANAGER = "aidc"                      # who the API server records for aidc's node writes
# Pods eviction leaves alone beyond kubectl drain's rules: the system-critical priority classes
# (their values start here), and the cluster's own namespace.
CRITICAL_PRIORITY = 2_000_000_000
CRITICAL_CLASSES = {"system-node-critical", "system-cluster-critical"}
SYSTEM_NAMESPACES = {"kube-system"}
# Node names are DNS subdomains (RFC 1123), at most 253 characters.
NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class KubernetesError(AidcError):
    """The API server refused or could not be reached; the quarantine did not happen."""

    exit_code = 1


class NodeGone(KubernetesError):
    """The node object no longer exists."""


class LeaderGuarded:
    """A backend that acts only while its controller holds the leader lease: the check is made
    right before every change, so a replica that lost the lease stops at its next call."""

    def __init__(self, backend, lease):
        self.backend, self.lease = backend, lease
        self.name = backend.name
        self.reports_only_managed_nodes = getattr(backend, "reports_only_managed_nodes", False)

    def quarantine(self, node: str, reason: str, event: str | None = None) -> str | None:
        self.lease.check()
        return self.backend.quarantine(node, reason, event=event)

    def release(self, node: str, reason: str):
        self.lease.check()
        return self.backend.release(node, reason)

    def state(self, node: str) -> str:
        return self.backend.state(node)

    def out_of_service(self):
        return self.backend.out_of_service()

    def known_nodes(self) -> set[str]:
        return self.backend.known_nodes()

    def gpu_isolation(self, node: str) -> str | None:
        return self.backend.gpu_isolation(node)

    def quarantine_gpu(self, node: str, gpu: int, reason: str, event: str | None = None) -> str | None:
        self.lease.check()
        return self.backend.quarantine_gpu(node, gpu, reason, event=event)

    def release_gpu(self, node: str, gpu: int, reason: str) -> str | None:
        self.lease.check()
        return self.backend.release_gpu(node, gpu, reason)


def api_client_from(settings):
    """An API client: in-cluster credentials in a pod, else the kubeconfig (spec, $KUBECONFIG, ~/.kube/config)."""
    import os

    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not settings.kubeconfig:
            config.load_incluster_config()
            return client.ApiClient()
        cfg = client.Configuration()
        config.load_kube_config(config_file=settings.kubeconfig, client_configuration=cfg)
        return client.ApiClient(cfg)
    except (config.ConfigException, OSError) as exc:
        raise KubernetesError(f"no Kubernetes credentials: {exc}") from None


class ReleaseRefused(KubernetesError):
    """aidc did not quarantine this node (an operator cordoned it, or it is gone): not released."""

    def __init__(self, decision: "ReleaseDecision"):
        super().__init__(decision.detail)
        self.decision = decision


@dataclass(frozen=True)
class ReleaseDecision:
    node: str
    verdict: str  # released | operator_cordon | not_quarantined | node_gone
    detail: str
    restored_spares: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"node": self.node, "verdict": self.verdict, "detail": self.detail,
                "restored_spares": list(self.restored_spares)}


def _reachable(method):
    """A connection that fails (refused, reset, timed out) is a KubernetesError naming it, like an
    error status: the controller then keeps the event pending and retries with backoff."""
    import functools

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        from urllib3.exceptions import HTTPError as Urllib3Error

        try:
            return method(self, *args, **kwargs)
        except (Urllib3Error, OSError) as exc:
            raise KubernetesError(f"API server unreachable: {type(exc).__name__}: {exc}") from None

    return call


def reason_code(reason: str) -> str:
    """A short label-value form of a free-text reason, for the taint value and condition reason."""
    xid = re.search(r"\bXID (\d{1,4})\b", reason)
    if xid:
        return f"xid-{xid.group(1)}"
    words = re.findall(r"[a-z0-9]+", reason.lower())[:4]
    return "-".join(words)[:63].strip("-") or "fault"


def _condition_reason(code: str) -> str:
    # Condition reasons are CamelCase identifiers by convention (KubeletReady, XidDetected...).
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", code) if part) or "Fault"


class KubernetesScheduler:
    name = "kubernetes"
    # Node names are the cluster's; out_of_service() counts only nodes of aidc's pools.
    reports_only_managed_nodes = True

    def __init__(self, api_client, settings, count_down_nodes: bool = True,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 own_pod: tuple[str, str] | None = None):
        import os

        from kubernetes import client

        # The controller's own pod (namespace, name), never evicted: the downward API gives it.
        self.own_pod = own_pod or (os.environ.get("POD_NAMESPACE", ""), os.environ.get("POD_NAME", ""))

        self._client = client
        self.core = client.CoreV1Api(api_client)
        self.settings = settings
        self.count_down_nodes = count_down_nodes
        self._sleep, self._clock = sleep, clock
        from aidc.failover.k8s_devices import DeviceTaints

        self.devices = DeviceTaints(api_client, settings)  # one GPU out: a DRA device taint

    # -- the protocol ---------------------------------------------------------------
    @_reachable
    def quarantine(self, node: str, reason: str, event: str | None = None) -> str | None:
        _check_name(node)
        code = reason_code(reason)
        try:
            self._patch_with_retry(node, lambda obj: self._quarantine_patch(obj, code, reason, event))
        except NodeGone:
            return f"node {node} no longer exists: nothing left to quarantine"
        warnings = []
        self._set_condition(node, "False", _condition_reason(code), reason[:1024])
        left = self.evict_pods(node)
        if left:
            warnings.append(f"{len(left)} pod(s) not evicted within {self.settings.eviction_timeout_s:g} s "
                            f"(disruption budget): {', '.join(left)}")
        if self.settings.promote_spares:
            spare = self.promote_spare(node)
            if spare is None:
                warnings.append("no healthy spare to promote")
        return "; ".join(warnings) or None

    @_reachable
    def release(self, node: str, reason: str) -> ReleaseDecision:
        """Undo what aidc did. Raises ReleaseRefused (with the decision) for a node aidc did not
        quarantine: an operator's cordon is theirs to lift."""
        _check_name(node)
        try:
            obj = self._read(node)
        except NodeGone:
            raise ReleaseRefused(ReleaseDecision(node, "node_gone", f"node {node} no longer exists")) from None
        record = _record(obj)
        if record is None:
            if obj.spec.unschedulable:
                raise ReleaseRefused(ReleaseDecision(node, "operator_cordon",
                                                     f"{node} is cordoned, but not by aidc: left for the operator"))
            raise ReleaseRefused(ReleaseDecision(node, "not_quarantined", f"{node} is not quarantined by aidc"))
        kept = []
        self._patch_with_retry(node, lambda o: self._release_patch(o, kept))
        self._set_condition(node, "True", "Released", reason[:1024])
        restored = self.restore_spares(node)
        return ReleaseDecision(node, "released", f"released {node}{kept[-1] if kept else ''}", restored)

    @_reachable
    def state(self, node: str) -> str:
        _check_name(node)
        obj = self._read(node)
        return "quarantined" if _record(obj) is not None or _has_taint(obj, QUARANTINE_TAINT) else "in_service"

    @_reachable
    def out_of_service(self) -> dict[str, str]:
        """Nodes out of service as the cluster says: quarantined by aidc (by aidc's own record and
        taint, on any node: removing a node's pool label does not hide aidc's quarantine), and
        (by policy) nodes of aidc's pools that are not Ready."""
        out = {}
        for obj in self._call(self.core.list_node).items:
            name = obj.metadata.name
            if _record(obj) is not None or _has_taint(obj, QUARANTINE_TAINT):
                out[name] = "quarantined by aidc"
            elif self.count_down_nodes and POOL_LABEL in (obj.metadata.labels or {}) and not _ready(obj):
                out[name] = "not Ready"
        return out

    # -- one GPU (aidc.failover.k8s_devices) ------------------------------------------
    def gpu_isolation(self, node: str) -> str | None:
        return self.devices.isolation(node)

    @_reachable
    def quarantine_gpu(self, node: str, gpu: int, reason: str, event: str | None = None) -> str | None:
        _check_name(node)
        return self.devices.taint(node, gpu, reason, event)

    @_reachable
    def release_gpu(self, node: str, gpu: int, reason: str) -> str | None:
        _check_name(node)
        return self.devices.untaint(node, gpu)

    @_reachable
    def gpu_state(self, node: str, gpu: int) -> str:
        return "quarantined" if self.devices.tainted(node, gpu) else "in_service"

    @_reachable
    def managed_nodes(self) -> list[str]:
        """The nodes of aidc's pools (label aidc.dev/pool): what runbooks may act on."""
        return sorted(o.metadata.name for o in self._call(self.core.list_node, label_selector=POOL_LABEL).items)

    def known_nodes(self) -> set[str]:
        """Node names are the cluster's: aidc knows the nodes of its pools."""
        return set(self.managed_nodes())

    # -- eviction --------------------------------------------------------------------
    def evict_pods(self, node: str) -> list[str]:
        """Evict the node's workload pods; returns those a disruption budget kept past the timeout."""
        deadline = self._clock() + self.settings.eviction_timeout_s
        backoff = Backoff(EVICTION_RETRY)
        pending = [p for p in self._call(self.core.list_pod_for_all_namespaces,
                                         field_selector=f"spec.nodeName={node}").items
                   if _evictable(p, self.own_pod)]
        while pending:
            refused = []
            for pod in pending:
                body = self._client.V1Eviction(metadata=self._client.V1ObjectMeta(
                    name=pod.metadata.name, namespace=pod.metadata.namespace))
                try:
                    self.core.create_namespaced_pod_eviction(pod.metadata.name, pod.metadata.namespace, body)
                except self._client.ApiException as exc:
                    if exc.status == 404:
                        continue  # gone already
                    if exc.status == 429:
                        refused.append(pod)
                        continue
                    raise KubernetesError(f"evicting {pod.metadata.namespace}/{pod.metadata.name}: "
                                          f"{exc.status} {exc.reason}") from None
            pending = refused
            delay = backoff.failed()
            if not pending or self._clock() + delay > deadline:
                break
            self._sleep(delay)
        return [f"{p.metadata.namespace}/{p.metadata.name}" for p in pending]

    # -- spares ----------------------------------------------------------------------
    def promote_spare(self, for_node: str) -> str | None:
        """Take the spare taint off one healthy, unpromoted spare; None when there is none."""
        nodes = sorted(self._call(self.core.list_node).items, key=lambda o: o.metadata.name)
        for obj in nodes:
            if (obj.metadata.annotations or {}).get(PROMOTED_FOR) == for_node:
                return obj.metadata.name  # promoted for this node already (a repeated call)
        for obj in nodes:
            if not _has_taint(obj, SPARE_TAINT) or not _ready(obj) or _record(obj) is not None \
                    or obj.spec.unschedulable:
                continue
            name = obj.metadata.name

            def promote(o, _for=for_node):
                if not _has_taint(o, SPARE_TAINT) or (o.metadata.annotations or {}).get(PROMOTED_FOR):
                    return None  # taken by someone else meanwhile
                return {"metadata": {"annotations": {PROMOTED_FOR: _for}},
                        "spec": {"taints": [_taint_dict(t) for t in (o.spec.taints or []) if t.key != SPARE_TAINT]}}

            try:
                if self._patch_with_retry(name, promote):
                    return name
            except NodeGone:
                continue
        return None

    def restore_spares(self, for_node: str) -> list[str]:
        restored = []
        for obj in self._call(self.core.list_node).items:
            if (obj.metadata.annotations or {}).get(PROMOTED_FOR) != for_node:
                continue

            def demote(o):
                taints = [_taint_dict(t) for t in (o.spec.taints or []) if t.key != SPARE_TAINT]
                taints.append({"key": SPARE_TAINT, "value": "true", "effect": "NoSchedule"})
                return {"metadata": {"annotations": {PROMOTED_FOR: None}}, "spec": {"taints": taints}}

            try:
                self._patch_with_retry(obj.metadata.name, demote)
                restored.append(obj.metadata.name)
            except NodeGone:
                pass
        return restored

    # -- building blocks -------------------------------------------------------------
    def _quarantine_patch(self, obj, code: str, reason: str, event: str | None) -> dict | None:
        record = _record(obj)
        if record is not None and _has_taint(obj, QUARANTINE_TAINT) and obj.spec.unschedulable:
            return None  # done already: a repeated call changes nothing
        if record is None:
            record = {"cordoned": not obj.spec.unschedulable, "tainted": not _has_taint(obj, QUARANTINE_TAINT),
                      "reason": reason[:512], "event": event, "at": time.time()}
        taints = [_taint_dict(t) for t in (obj.spec.taints or [])]
        if not _has_taint(obj, QUARANTINE_TAINT):
            taints.append({"key": QUARANTINE_TAINT, "value": code,
                           "effect": self.settings.quarantine_taint_effect})
        return {"metadata": {"annotations": {RECORD: json.dumps(record, sort_keys=True)}},
                "spec": {"unschedulable": True, "taints": taints}}

    def _release_patch(self, obj, kept: list) -> dict | None:
        """Undo aidc's part; `kept` gets a note when the cordon is not aidc's to lift."""
        record = _record(obj)
        if record is None:
            return None
        spec: dict = {}
        if record.get("tainted", True):
            spec["taints"] = [_taint_dict(t) for t in (obj.spec.taints or []) if t.key != QUARANTINE_TAINT]
        if obj.spec.unschedulable:
            if record.get("cordoned", True) and _manages(obj, ("spec", "unschedulable")):
                spec["unschedulable"] = False
            else:
                owners = _managers(obj, ("spec", "unschedulable"))
                kept.append(f" (the cordon stays: set by {', '.join(owners) or 'someone else'}, not aidc)")
        return {"metadata": {"annotations": {RECORD: None}}, "spec": spec}

    def _patch_with_retry(self, node: str, build) -> bool:
        """Read, build a patch from what was read, patch with that resourceVersion; on 409, again."""
        for _ in range(CONFLICT_RETRIES):
            obj = self._read(node)
            patch = build(obj)
            if patch is None:
                return False
            patch.setdefault("metadata", {})["resourceVersion"] = obj.metadata.resource_version
            try:
                self.core.patch_node(node, patch, field_manager=FIELD_MANAGER)
                return True
            except self._client.ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    raise NodeGone(f"node {node} no longer exists") from None
                raise KubernetesError(f"patching node {node}: {exc.status} {exc.reason}") from None
        raise KubernetesError(f"node {node} kept changing under {CONFLICT_RETRIES} attempts to patch it")

    def _set_condition(self, node: str, status: str, reason: str, message: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cond = {"type": CONDITION, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": now}
        try:
            self.core.patch_node_status(node, {"status": {"conditions": [cond]}}, field_manager=FIELD_MANAGER)
        except self._client.ApiException as exc:
            if exc.status != 404:
                raise KubernetesError(f"setting condition {CONDITION} on {node}: {exc.status} {exc.reason}") from None

    def _read(self, node: str):
        try:
            return self.core.read_node(node)
        except self._client.ApiException as exc:
            if exc.status == 404:
                raise NodeGone(f"node {node} no longer exists") from None
            raise KubernetesError(f"reading node {node}: {exc.status} {exc.reason}") from None

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._client.ApiException as exc:
            raise KubernetesError(f"{fn.__name__}: {exc.status} {exc.reason}") from None


def _check_name(node: str) -> None:
    if not isinstance(node, str) or len(node) > 253 or not NODE_NAME.fullmatch(node):
        raise KubernetesError(f"not a Kubernetes node name: {str(node)[:80]!r}")


def _record(obj) -> dict | None:
    text = (obj.metadata.annotations or {}).get(RECORD)
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"cordoned": False, "tainted": True}  # unreadable: undo only our own taint
    return record if isinstance(record, dict) else {"cordoned": False, "tainted": True}


def _has_taint(obj, key: str) -> bool:
    return any(t.key == key for t in (obj.spec.taints or []))


def _taint_dict(taint) -> dict:
    out = {"key": taint.key, "effect": taint.effect}
    if taint.value is not None:
        out["value"] = taint.value
    if taint.time_added is not None:
        out["timeAdded"] = taint.time_added.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def _ready(obj) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (obj.status.conditions or []))


def _managers(obj, path: tuple) -> list[str]:
    """The field managers the API server names for the field at `path`."""
    wanted = tuple(f"f:{p}" for p in path)
    owners = []
    for entry in obj.metadata.managed_fields or []:
        fields = entry.fields_v1 or {}
        for key in wanted:
            fields = fields.get(key) if isinstance(fields, dict) else None
        if fields is not None:
            owners.append(entry.manager)
    return sorted(set(owners))


def _manages(obj, path: tuple) -> bool:
    """aidc set this field, and no one has changed it since."""
    return _managers(obj, path) == [FIELD_MANAGER]


def _evictable(pod, own_pod: tuple[str, str] = ("", "")) -> bool:
    """kubectl drain --ignore-daemonsets's filters, plus what keeps the cluster and aidc running."""
    meta, spec = pod.metadata, pod.spec
    if (meta.annotations or {}).get("kubernetes.io/config.mirror"):
        return False  # a static pod's mirror: the kubelet owns it
    if any(ref.kind == "DaemonSet" for ref in (meta.owner_references or [])):
        return False
    if meta.namespace in SYSTEM_NAMESPACES or (meta.namespace, meta.name) == tuple(own_pod):
        return False
    if spec is not None and (spec.priority_class_name in CRITICAL_CLASSES
                             or (spec.priority or 0) >= CRITICAL_PRIORITY):
        return False
    return (pod.status.phase if pod.status else None) not in ("Succeeded", "Failed")
