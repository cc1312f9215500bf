"""Names, labels and taints shared by the components (one place, so they cannot drift apart)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from aidc.spec import ClusterSpec, NodePool

PKG = "aidc"  # type-token package: "aidc:<module>:<Name>"
LABEL_DOMAIN = "aidc.dev"
AGENT_NAMESPACE = "aidc-system"
TRAINING_NAMESPACE = "aidc-training"
GPU_OPERATOR_NAMESPACE = "gpu-operator"
NETWORK_OPERATOR_NAMESPACE = "nvidia-network-operator"
NVIDIA_HELM_REPO = "https://helm.ngc.nvidia.com/nvidia"

# Every GPU node carries this taint, so only pods that ask for GPUs land there.
GPU_TAINT = {"key": "nvidia.com/gpu", "effect": "NoSchedule"}
# Spares carry a second taint: nothing schedules there until failover promotes the spare.
SPARE_TAINT = {"key": f"{LABEL_DOMAIN}/spare", "value": "true", "effect": "NoSchedule"}

DATA = Path(__file__).resolve().parent / "data"


def managed_labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "pulumi", "app.kubernetes.io/part-of": "aidc",
            f"{LABEL_DOMAIN}/component": component}


def node_labels(spec: ClusterSpec, pool: NodePool, spare: bool) -> dict[str, str]:
    """Labels every node of a pool carries: pool, GPU model, rail topology, spare or not."""
    fabric = spec.fabric
    return {
        **pool.labels,
        f"{LABEL_DOMAIN}/pool": pool.name,
        f"{LABEL_DOMAIN}/gpu-model": pool.gpu_model,
        f"{LABEL_DOMAIN}/gpus": str(pool.gpus_per_node),
        f"{LABEL_DOMAIN}/fabric": fabric.kind,
        f"{LABEL_DOMAIN}/rails": str(fabric.rails),
        f"{LABEL_DOMAIN}/rail-gbps": f"{fabric.link_speed_gbps:g}",
        f"{LABEL_DOMAIN}/spare": "true" if spare else "false",
    }


def real_gpu_pools(spec: ClusterSpec) -> list[NodePool]:
    """Pools of real GPUs (the lab's simulated ones need no GPU Operator, runtime or taint)."""
    return [p for p in spec.node_pools if not p.simulated]


def has_rail_fabric(spec: ClusterSpec) -> bool:
    # netns is the lab's fabric on one machine (aidc.lab.fabric): nothing for a cluster to deploy.
    return spec.fabric.kind not in ("loopback", "netns") and spec.fabric.rails > 0


@lru_cache(maxsize=None)
def catalog(name: str) -> dict:
    """A versioned data file under aidc_infra/data/."""
    return yaml.safe_load((DATA / name).read_text())
