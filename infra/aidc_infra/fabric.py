"""Fabric: NVIDIA Network Operator release, NicClusterPolicy, and one IP pool + attachment per rail."""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass

import pulumi
from pulumi_kubernetes.apiextensions import CustomResource
from pulumi_kubernetes.helm.v3 import Release, RepositoryOptsArgs

from aidc.errors import SpecError
from aidc.spec import ClusterSpec
from aidc_infra.common import (
    LABEL_DOMAIN, NETWORK_OPERATOR_NAMESPACE, NVIDIA_HELM_REPO, PKG, TRAINING_NAMESPACE, managed_labels,
    real_gpu_pools,
)

NIC_POLICY_API = "mellanox.com/v1alpha1"  # pinned: Network Operator (schemas/mellanox.com_*)
IPPOOL_API = "nv-ipam.nvidia.com/v1alpha1"
NAD_API = "k8s.cni.cncf.io/v1"
MELLANOX_REPO = "nvcr.io/nvidia/mellanox"
SPEC_FILE = "<stack config>"  # SpecErrors raised here concern the stack's aidc:cluster value


@dataclass(frozen=True)
class Rail:
    index: int
    name: str           # IP pool and network attachment name
    ifname: str         # netdev the secondary network attaches to
    hca: str | None     # RDMA device, when the spec lists them
    subnet: str
    per_node_block: int  # addresses each node takes from the pool: one per GPU pod
    rdma_resource: str  # extended resource a pod requests to get this rail


def default_ifname(kind: str, index: int) -> str:
    return f"ib{index}" if kind == "infiniband" else f"rail{index}"


def rail_plan(spec: ClusterSpec) -> list[Rail]:
    """Carve `fabric.ipam_cidr` into one equal subnet per rail, sized for every node's block."""
    fabric = spec.fabric
    if fabric.kind in ("loopback", "netns") or fabric.rails == 0:
        return []
    base = ipaddress.IPv4Network(fabric.ipam_cidr)
    prefix = base.prefixlen + math.ceil(math.log2(fabric.rails)) if fabric.rails > 1 else base.prefixlen
    if prefix > 30:
        raise SpecError(SPEC_FILE, "aidc:cluster.fabric.ipam_cidr",
                        f"a network that splits into {fabric.rails} rail subnets, not {base}")
    subnets = list(base.subnets(new_prefix=prefix))[: fabric.rails]
    block = max([2] + [p.gpus_per_node for p in real_gpu_pools(spec)])
    nodes = sum(p.count + p.spares for p in spec.node_pools)
    usable = subnets[0].num_addresses - 2
    if nodes * block > usable:
        raise SpecError(SPEC_FILE, "aidc:cluster.fabric.ipam_cidr",
                        f"room for {nodes} nodes x {block} addresses per rail subnet; {base} split "
                        f"{fabric.rails} ways gives /{prefix} with {usable} usable addresses")
    return [Rail(i, f"rail-{i}", fabric.rail_ifnames[i] if fabric.rail_ifnames else default_ifname(fabric.kind, i),
                 fabric.hcas[i] if fabric.hcas else None, str(subnets[i]), block, f"rdma_rail_{i}")
            for i in range(fabric.rails)]


def rdma_device_plugin_config(rails: list[Rail]) -> str:
    # One shared RDMA resource per rail, so a pod can ask for exactly the rails it uses.
    return json.dumps({"configList": [
        {"resourceName": r.rdma_resource, "rdmaHcaMax": 63, "selectors": {"ifNames": [r.ifname]}} for r in rails]})


def nic_cluster_policy(spec: ClusterSpec, rails: list[Rail]) -> dict:
    tag = f"network-operator-v{spec.software.network_operator_chart}"
    image = lambda name: {"image": name, "repository": MELLANOX_REPO, "version": tag}  # noqa: E731
    secondary = {"cniPlugins": image("plugins"), "multus": image("multus-cni")}
    if spec.fabric.kind == "infiniband":
        secondary["ipoib"] = image("ipoib-cni")
    # No ofedDriver: the NIC driver (DOCA/MOFED) is installed on the host by the node playbooks,
    # like the GPU driver, so one tool owns each kernel module.
    return {
        "rdmaSharedDevicePlugin": {**image("k8s-rdma-shared-dev-plugin"), "config": rdma_device_plugin_config(rails)},
        "nvIpam": {**image("nvidia-k8s-ipam"), "enableWebhook": False},
        "secondaryNetwork": secondary,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": f"{LABEL_DOMAIN}/spare", "operator": "Exists", "effect": "NoSchedule"}],
    }


def ip_pool(spec: ClusterSpec, rail: Rail) -> dict:
    return {"subnet": rail.subnet, "perNodeBlockSize": rail.per_node_block,
            "nodeSelector": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": f"{LABEL_DOMAIN}/fabric", "operator": "In", "values": [spec.fabric.kind]}]}]}}


def cni_config(spec: ClusterSpec, rail: Rail) -> dict:
    ipam = {"type": "nv-ipam", "poolName": rail.name}
    if spec.fabric.kind == "infiniband":
        return {"cniVersion": "0.3.1", "name": rail.name, "type": "ipoib", "master": rail.ifname, "ipam": ipam}
    return {"cniVersion": "0.3.1", "name": rail.name, "type": "macvlan", "mode": "bridge",
            "master": rail.ifname, "ipam": ipam}


@dataclass(frozen=True)
class FabricArgs:
    spec: ClusterSpec
    gpu_operator_present: bool  # the GPU Operator runs NFD; a second NFD would fight over labels
    training_namespace: pulumi.Input[str] = TRAINING_NAMESPACE


class Fabric(pulumi.ComponentResource):
    def __init__(self, name: str, args: FabricArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:fabric:Fabric", name, None, opts)
        spec = args.spec
        child = pulumi.ResourceOptions(parent=self)
        self.rails = rail_plan(spec)
        self.release = Release(
            f"{name}-network-operator", name="network-operator", chart="network-operator",
            version=spec.software.network_operator_chart,
            repository_opts=RepositoryOptsArgs(repo=NVIDIA_HELM_REPO),
            namespace=NETWORK_OPERATOR_NAMESPACE, create_namespace=True,
            values={"nfd": {"enabled": not args.gpu_operator_present},
                    "sriovNetworkOperator": {"enabled": False}},
            skip_await=True, opts=child)
        after_crds = pulumi.ResourceOptions(parent=self, depends_on=[self.release])
        self.policy = CustomResource(
            f"{name}-nic-cluster-policy", api_version=NIC_POLICY_API, kind="NicClusterPolicy",
            metadata={"name": "nic-cluster-policy", "labels": managed_labels("fabric")},
            spec=nic_cluster_policy(spec, self.rails), opts=after_crds)
        self.pools, self.attachments = [], []
        for rail in self.rails:
            labels = {**managed_labels("fabric"), f"{LABEL_DOMAIN}/rail": str(rail.index)}
            self.pools.append(CustomResource(
                f"{name}-{rail.name}-pool", api_version=IPPOOL_API, kind="IPPool",
                metadata={"name": rail.name, "namespace": NETWORK_OPERATOR_NAMESPACE, "labels": labels},
                spec=ip_pool(spec, rail), opts=after_crds))
            self.attachments.append(CustomResource(
                f"{name}-{rail.name}-net", api_version=NAD_API, kind="NetworkAttachmentDefinition",
                metadata={"name": rail.name, "namespace": args.training_namespace, "labels": labels,
                          "annotations": {"k8s.v1.cni.cncf.io/resourceName": f"rdma/{rail.rdma_resource}"}},
                spec={"config": json.dumps(cni_config(spec, rail), sort_keys=True)}, opts=after_crds))
        self.register_outputs({"rails": [r.name for r in self.rails]})
