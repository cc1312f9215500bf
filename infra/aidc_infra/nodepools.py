"""GPU node pools: Karpenter NodePool + EC2NodeClass, or Cluster API MachineDeployment, per pool.

The pool's `provisioner` chooses; "static" pools (the lab, hand-racked machines) get no
provisioning resources. Spares are a pool of their own, tainted so that only a failover that
promotes them (by removing the spare taint) puts work there.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_kubernetes.apiextensions import CustomResource

from aidc.spec import ClusterSpec, NodePool
from aidc_infra.common import GPU_TAINT, LABEL_DOMAIN, PKG, SPARE_TAINT, managed_labels, node_labels

KARPENTER_API = "karpenter.sh/v1"  # pinned: Karpenter v1.14.1 (schemas/karpenter.sh_NodePool_v1.json)
EC2_NODECLASS_API = "karpenter.k8s.aws/v1"
CAPI_API = "cluster.x-k8s.io/v1beta2"  # pinned: Cluster API v1.14.0
KUBEADM_API = "bootstrap.cluster.x-k8s.io/v1beta2"
CAPI_NAMESPACE = "default"


@dataclass(frozen=True)
class PoolPlan:
    """One provisioned group of identical nodes (a pool's workers, or its spares)."""

    name: str
    pool: NodePool
    replicas: int
    spare: bool


def pool_plans(spec: ClusterSpec) -> list[PoolPlan]:
    """What the component provisions: workers and spares of every non-static pool."""
    plans: list[PoolPlan] = []
    for pool in spec.node_pools:
        if pool.provisioner == "static":
            continue
        plans.append(PoolPlan(f"{spec.name}-{pool.name}", pool, pool.count, False))
        if pool.spares:
            plans.append(PoolPlan(f"{spec.name}-{pool.name}-spare", pool, pool.spares, True))
    return plans


def taints(plan: PoolPlan) -> list[dict]:
    return [dict(GPU_TAINT)] + ([dict(SPARE_TAINT)] if plan.spare else [])


def disruption_budget(spec: ClusterSpec) -> str:
    """Karpenter budget `nodes`: the spec's max_unavailable, as an integer or a percentage string."""
    return str(spec.policy.max_unavailable)


def karpenter_nodepool(spec: ClusterSpec, plan: PoolPlan, nodeclass: str) -> dict:
    pool = plan.pool
    requirements = [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand", "reserved"]}]
    if pool.instance_type:
        requirements.append({"key": "node.kubernetes.io/instance-type", "operator": "In",
                             "values": [pool.instance_type]})
    else:
        requirements += [
            {"key": "karpenter.k8s.aws/instance-gpu-name", "operator": "In", "values": [pool.gpu_model.lower()]},
            {"key": "karpenter.k8s.aws/instance-gpu-count", "operator": "In", "values": [str(pool.gpus_per_node)]},
        ]
    return {
        # Static capacity (`replicas`, Karpenter's StaticCapacity feature gate): a training
        # cluster holds its nodes whether or not pods are pending. limits.nodes == replicas
        # because reserved GPU capacity has no headroom to surge into.
        "replicas": plan.replicas,
        "limits": {"nodes": plan.replicas},
        "template": {
            "metadata": {"labels": node_labels(spec, pool, plan.spare)},
            "spec": {
                "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": nodeclass},
                "requirements": requirements,
                "taints": taints(plan),
                # A node must never be recycled under a running job: expiry is off, and
                # replacements go through the aidc drain path instead.
                "expireAfter": "Never",
            },
        },
        "disruption": {"consolidationPolicy": "WhenEmpty", "consolidateAfter": "Never",
                       "budgets": [{"nodes": disruption_budget(spec)}]},
    }


def ec2_nodeclass(spec: ClusterSpec, plan: PoolPlan) -> dict:
    ebs = {"volumeSize": "200Gi", "volumeType": "gp3", "encrypted": True}
    if spec.kms.provider == "aws-kms":
        ebs["kmsKeyID"] = spec.kms.key_id  # root volumes under the same key as secrets and checkpoints
    return {
        # The EKS-optimized AL2023 image; Karpenter picks its NVIDIA variant for GPU instances.
        "amiSelectorTerms": [{"alias": "al2023@latest"}],
        "role": f"KarpenterNodeRole-{spec.name}",
        "subnetSelectorTerms": [{"tags": {"karpenter.sh/discovery": spec.name}}],
        "securityGroupSelectorTerms": [{"tags": {"karpenter.sh/discovery": spec.name}}],
        # Local NVMe instance stores become one RAID0 volume for the aidc-local-nvme class.
        "instanceStorePolicy": "RAID0",
        "blockDeviceMappings": [{"deviceName": "/dev/xvda", "rootVolume": True, "ebs": ebs}],
        "metadataOptions": {"httpTokens": "required", "httpPutResponseHopLimit": 1},
        "tags": {"aidc.dev/cluster": spec.name, "aidc.dev/pool": plan.pool.name},
    }


def capi_rollout(spec: ClusterSpec) -> dict:
    """Rolling replacement within the spec's budget; none at all when max_unavailable is 0."""
    if spec.policy.max_unavailable in (0, "0%"):
        return {"strategy": {"type": "OnDelete"}}
    return {"strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": spec.policy.max_unavailable}}}


def machine_deployment(spec: ClusterSpec, plan: PoolPlan) -> dict:
    selector = {f"{LABEL_DOMAIN}/pool": plan.pool.name, f"{LABEL_DOMAIN}/spare": str(plan.spare).lower()}
    return {
        "clusterName": spec.name,
        "replicas": plan.replicas,
        "selector": {"matchLabels": selector},
        "rollout": capi_rollout(spec),
        "template": {
            "metadata": {"labels": selector},
            "spec": {
                "clusterName": spec.name,
                "version": f"v{spec.software.kubernetes_version}",
                "bootstrap": {"configRef": {"apiGroup": "bootstrap.cluster.x-k8s.io",
                                            "kind": "KubeadmConfigTemplate", "name": plan.name}},
                "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io",
                                      "kind": plan.pool.machine_template_kind, "name": plan.name},
                "taints": [{**t, "propagation": "Always"} for t in taints(plan)],
            },
        },
    }


def kubeadm_config_template(spec: ClusterSpec, plan: PoolPlan) -> dict:
    # Node labels travel through the kubelet (CAPI syncs only its own label domains to nodes);
    # taints are set at registration too, so no pod lands in the moment before CAPI syncs them.
    labels = ",".join(f"{k}={v}" for k, v in sorted(node_labels(spec, plan.pool, plan.spare).items()))
    return {"template": {"spec": {"joinConfiguration": {"nodeRegistration": {
        "kubeletExtraArgs": [{"name": "node-labels", "value": labels}],
        "taints": taints(plan),
    }}}}}


@dataclass(frozen=True)
class GpuNodePoolsArgs:
    spec: ClusterSpec


class GpuNodePools(pulumi.ComponentResource):
    """Provisioning objects for every non-static pool and its spares."""

    def __init__(self, name: str, args: GpuNodePoolsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:nodepools:GpuNodePools", name, None, opts)
        spec = args.spec
        child = pulumi.ResourceOptions(parent=self)
        self.plans = pool_plans(spec)
        self.pools: dict[str, CustomResource] = {}
        for plan in self.plans:
            meta = {"name": plan.name, "labels": managed_labels("nodepools")}
            if plan.pool.provisioner == "karpenter":
                CustomResource(f"{plan.name}-nodeclass", api_version=EC2_NODECLASS_API, kind="EC2NodeClass",
                               metadata=meta, spec=ec2_nodeclass(spec, plan), opts=child)
                self.pools[plan.name] = CustomResource(
                    f"{plan.name}-nodepool", api_version=KARPENTER_API, kind="NodePool", metadata=meta,
                    spec=karpenter_nodepool(spec, plan, plan.name), opts=child)
            else:  # cluster-api
                ns_meta = {**meta, "namespace": CAPI_NAMESPACE}
                CustomResource(f"{plan.name}-kubeadm", api_version=KUBEADM_API, kind="KubeadmConfigTemplate",
                               metadata=ns_meta, spec=kubeadm_config_template(spec, plan), opts=child)
                self.pools[plan.name] = CustomResource(
                    f"{plan.name}-machines", api_version=CAPI_API, kind="MachineDeployment", metadata=ns_meta,
                    spec=machine_deployment(spec, plan), opts=child)
        self.register_outputs({"pools": [p.name for p in self.plans]})
