"""spec -> components -> exports. The only place that decides which components a stack gets."""

from __future__ import annotations

from pathlib import Path

import pulumi

from aidc.spec import ClusterSpec
from aidc_infra.agent import NodeAgent, NodeAgentArgs, needs_privilege
from aidc_infra.burnin import BurninRole, BurninRoleArgs
from aidc_infra.common import has_rail_fabric, real_gpu_pools
from aidc_infra.controller import FailoverControllerArgs, FailoverControllerDeployment
from aidc_infra.fabric import Fabric, FabricArgs
from aidc_infra.gpu_platform import GpuPlatform, GpuPlatformArgs, driver_upgrade_policy
from aidc_infra.kms import KmsEncryption, KmsEncryptionArgs
from aidc_infra.namespaces import Namespaces
from aidc_infra.nodepools import GpuNodePools, GpuNodePoolsArgs
from aidc_infra.storage import Storage, StorageArgs

ALERT_RULES = Path("runbooks/alerts/aidc-alerts.yml")  # written by the on-call automation


def build(spec: ClusterSpec, root: Path) -> dict:
    """Create every component the spec calls for; return the stack's exports."""
    namespaces = Namespaces("aidc")
    pools = GpuNodePools("aidc", GpuNodePoolsArgs(spec))
    # Simulated GPUs (the lab) need no GPU Operator; a loopback or lab netns fabric needs no Network Operator.
    gpu = GpuPlatform("aidc", GpuPlatformArgs(spec)) if real_gpu_pools(spec) else None
    fabric = (Fabric("aidc", FabricArgs(spec, gpu_operator_present=gpu is not None,
                                        training_namespace=namespaces.training.metadata.name))
              if has_rail_fabric(spec) else None)
    storage = Storage("aidc", StorageArgs(spec, training_namespace=namespaces.training.metadata.name))
    kms = KmsEncryption("aidc", KmsEncryptionArgs(spec, agent_namespace=namespaces.agent.metadata.name))
    agent = NodeAgent("aidc", NodeAgentArgs(spec, alert_rules=root / ALERT_RULES,
                                            namespace=namespaces.agent.metadata.name))
    # Failover acts through the Kubernetes API only on a Kubernetes-scheduled cluster.
    controller = (FailoverControllerDeployment("aidc", FailoverControllerArgs(spec), opts=pulumi.ResourceOptions(
        depends_on=[namespaces, agent])) if spec.scheduler == "kubernetes" else None)
    if controller is not None:  # the burn-in's Jobs live in the controller's namespace
        BurninRole("aidc", BurninRoleArgs(spec), opts=pulumi.ResourceOptions(depends_on=[controller]))
    return {
        "cluster": spec.name,
        "node_pools": [p.name for p in pools.plans],
        "gpu_nodes": sum(p.count + p.spares for p in real_gpu_pools(spec)),
        "gpu_operator_chart": spec.software.gpu_operator_chart if gpu else None,
        "driver_upgrade_parallelism": driver_upgrade_policy(spec)["maxParallelUpgrades"] if gpu else None,
        "rails": [{"name": r.name, "ifname": r.ifname, "subnet": r.subnet} for r in fabric.rails] if fabric else [],
        "storage_classes": {p.role: p.class_name for p in storage.plans},
        "encryption_configuration": kms.document,
        "kms_key_id": spec.kms.key_id,
        "agent_privileged": needs_privilege(spec),
        "failover_controller_replicas": spec.kubernetes.controller_replicas if controller else 0,
    }
