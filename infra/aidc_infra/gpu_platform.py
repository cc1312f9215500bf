"""GPU platform: the NVIDIA GPU Operator Helm release, its values derived from the spec."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_kubernetes.helm.v3 import Release, RepositoryOptsArgs

from aidc.spec import ClusterSpec
from aidc_infra.common import GPU_OPERATOR_NAMESPACE, GPU_TAINT, NVIDIA_HELM_REPO, PKG, SPARE_TAINT, real_gpu_pools


def gpu_node_count(spec: ClusterSpec) -> int:
    return sum(p.count + p.spares for p in real_gpu_pools(spec))


def driver_upgrade_policy(spec: ClusterSpec) -> dict:
    """Driver upgrades take down at most the spec's max_unavailable nodes at a time.

    The operator reads maxParallelUpgrades=0 as "no limit", so a budget of zero nodes turns
    automatic upgrades off instead of passing 0 through.
    """
    parallel = spec.policy.max_unavailable_nodes(gpu_node_count(spec))
    return {
        "autoUpgrade": parallel > 0,
        "maxParallelUpgrades": max(parallel, 1),
        "maxUnavailable": str(spec.policy.max_unavailable),
        # GPU pods are deleted by the operator; a full drain also moves the rest off the node.
        "drain": {"enable": True, "force": False, "deleteEmptyDir": True, "timeoutSeconds": 600},
    }


def gpu_operator_values(spec: ClusterSpec) -> dict:
    by_operator = spec.software.driver_source == "operator"
    driver: dict = {"enabled": by_operator, "upgradePolicy": driver_upgrade_policy(spec)}
    if by_operator:
        # The spec names a driver branch, not a build: precompiled driver images are published per branch.
        driver.update(usePrecompiled=True, version=spec.software.driver_branch)
    toleration = lambda taint: {"key": taint["key"], "operator": "Exists", "effect": taint["effect"]}  # noqa: E731
    return {
        "nfd": {"enabled": True},
        "driver": driver,
        "toolkit": {"enabled": True},
        "devicePlugin": {"enabled": True},
        "dcgmExporter": {"enabled": True, "serviceMonitor": {"enabled": True, "interval": "15s"}},
        "gfd": {"enabled": True},
        "migManager": {"enabled": True},
        # Operands must run on spares too: a spare has to be ready the moment it is promoted.
        "daemonsets": {"tolerations": [toleration(GPU_TAINT), toleration(SPARE_TAINT)]},
    }


@dataclass(frozen=True)
class GpuPlatformArgs:
    spec: ClusterSpec


class GpuPlatform(pulumi.ComponentResource):
    def __init__(self, name: str, args: GpuPlatformArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:gpu:GpuPlatform", name, None, opts)
        spec = args.spec
        self.values = gpu_operator_values(spec)
        self.release = Release(
            f"{name}-gpu-operator", name="gpu-operator", chart="gpu-operator",
            version=spec.software.gpu_operator_chart,
            repository_opts=RepositoryOptsArgs(repo=NVIDIA_HELM_REPO),
            namespace=GPU_OPERATOR_NAMESPACE, create_namespace=True, values=self.values,
            # Operands roll out node by node; a release is ready long before every node is.
            skip_await=True, opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({"chart_version": spec.software.gpu_operator_chart})
