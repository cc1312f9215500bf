"""Storage: StorageClasses for the parallel filesystem and local NVMe, and the two training PVCs.

Checkpoints are the only copy of hours of GPU time: their class reclaims with Retain, so
deleting the claim (or the stack) never deletes the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_kubernetes.core.v1 import PersistentVolumeClaim
from pulumi_kubernetes.storage.v1 import StorageClass

from aidc.spec import ClusterSpec, Volume
from aidc_infra.common import LABEL_DOMAIN, PKG, TRAINING_NAMESPACE, catalog, managed_labels, real_gpu_pools

RECLAIM = {"datasets": "Delete", "checkpoints": "Retain"}  # datasets can be re-staged; checkpoints cannot
LOCAL_NVME_CLASS = "aidc-local-nvme"


@dataclass(frozen=True)
class VolumePlan:
    role: str               # datasets | checkpoints
    class_name: str
    provisioner: str
    parameters: dict
    shared: bool
    reclaim: str
    size: str

    @property
    def access_mode(self) -> str:
        return "ReadWriteMany" if self.shared else "ReadWriteOnce"

    @property
    def binding_mode(self) -> str:
        # Node-local volumes must bind where the pod is scheduled, not where the disk happens to be.
        return "Immediate" if self.shared else "WaitForFirstConsumer"


def volume_plan(role: str, volume: Volume) -> VolumePlan:
    entry = catalog("storage_provisioners.yaml")["classes"][volume.storage_class]
    return VolumePlan(role, f"aidc-{role}", volume.provisioner or entry["provisioner"], dict(volume.parameters),
                      bool(entry["shared"]), RECLAIM[role], volume.size)


def volume_plans(spec: ClusterSpec) -> list[VolumePlan]:
    return [volume_plan("datasets", spec.storage.datasets), volume_plan("checkpoints", spec.storage.checkpoints)]


def storage_class_body(plan: VolumePlan) -> dict:
    return {"provisioner": plan.provisioner, "reclaimPolicy": plan.reclaim, "parameters": plan.parameters,
            "volumeBindingMode": plan.binding_mode, "allowVolumeExpansion": plan.shared}


@dataclass(frozen=True)
class StorageArgs:
    spec: ClusterSpec
    training_namespace: pulumi.Input[str] = TRAINING_NAMESPACE


class Storage(pulumi.ComponentResource):
    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:storage:Storage", name, None, opts)
        spec = args.spec
        child = pulumi.ResourceOptions(parent=self)
        self.plans = volume_plans(spec)
        self.classes: dict[str, StorageClass] = {}
        self.claims: dict[str, PersistentVolumeClaim] = {}
        for plan in self.plans:
            labels = {**managed_labels("storage"), f"{LABEL_DOMAIN}/volume": plan.role}
            self.classes[plan.role] = StorageClass(
                f"{name}-{plan.role}-class", metadata={"name": plan.class_name, "labels": labels},
                **_snake(storage_class_body(plan)), opts=child)
            annotations = {} if plan.shared else {"pulumi.com/skipAwait": "true"}  # binds on first use
            self.claims[plan.role] = PersistentVolumeClaim(
                f"{name}-{plan.role}-claim",
                metadata={"name": plan.role, "namespace": args.training_namespace, "labels": labels,
                          "annotations": annotations},
                spec={"accessModes": [plan.access_mode], "storageClassName": plan.class_name,
                      "resources": {"requests": {"storage": plan.size}}},
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.classes[plan.role]]))
        if real_gpu_pools(spec):
            # Scratch space on the GPU nodes' local NVMe (the instance-store RAID0 / local PVs).
            self.classes["local-nvme"] = StorageClass(
                f"{name}-local-nvme-class",
                metadata={"name": LOCAL_NVME_CLASS, "labels": {**managed_labels("storage"),
                                                               f"{LABEL_DOMAIN}/volume": "scratch"}},
                provisioner="kubernetes.io/no-provisioner", reclaim_policy="Delete",
                volume_binding_mode="WaitForFirstConsumer", opts=child)
        self.register_outputs({"classes": [p.class_name for p in self.plans]})


def _snake(body: dict) -> dict:
    names = {"reclaimPolicy": "reclaim_policy", "volumeBindingMode": "volume_binding_mode",
             "allowVolumeExpansion": "allow_volume_expansion"}
    return {names.get(k, k): v for k, v in body.items()}
