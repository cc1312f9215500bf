"""The cluster spec: one typed model read from the stack file `Pulumi.<stack>.yaml`.

The same model feeds the Pulumi program (`infra/`), the Ansible inventory
(`aidc inventory`) and the node agent. It lives under the Pulumi config key
`aidc:cluster`, so `pulumi config get aidc:cluster --json` shows exactly what the
agent sees.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aidc.errors import SpecError

CONFIG_KEY = "aidc:cluster"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"


@lru_cache(maxsize=1)
def gpu_models() -> dict[str, dict]:
    """The GPU model catalog (versioned data file `data/gpu_models.yaml`)."""
    text = resources.files("aidc").joinpath("data/gpu_models.yaml").read_text()
    return yaml.safe_load(text)["models"]


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt key silently ignored is a misconfigured cluster.
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodePool(_Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    count: Annotated[int, Field(ge=1, le=10000)]
    gpu_model: str
    gpus_per_node: Annotated[int, Field(ge=1, le=16)]
    spares: Annotated[int, Field(ge=0, le=1000)] = 0
    provisioner: Literal["karpenter", "cluster-api", "static"] = "static"
    instance_type: str | None = None
    labels: dict[str, str] = {}

    @field_validator("gpu_model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in gpu_models():
            raise ValueError(f"one of {', '.join(sorted(gpu_models()))}, not {value!r}")
        return value

    @property
    def simulated(self) -> bool:
        return bool(gpu_models()[self.gpu_model].get("simulated", False))


class Fabric(_Strict):
    kind: Literal["infiniband", "roce", "ethernet", "loopback"] = "loopback"
    rails: Annotated[int, Field(ge=0, le=32)] = 0
    link_speed_gbps: Annotated[float, Field(gt=0)] = 100
    hcas: list[str] = []
    socket_ifname: str = "lo"
    gid_index: Annotated[int, Field(ge=0)] | None = None
    topology_file: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Fabric":
        if self.hcas and len(self.hcas) != self.rails:
            raise ValueError(f"hcas lists {len(self.hcas)} devices but rails is {self.rails}")
        if self.kind == "roce" and self.gid_index is None:
            raise ValueError("gid_index is required for RoCE fabrics")
        if self.kind in ("infiniband", "roce") and self.rails < 1:
            raise ValueError(f"a {self.kind} fabric needs rails >= 1")
        return self


class Volume(_Strict):
    storage_class: Literal["lustre", "nfs", "weka", "gpfs", "local-nvme", "hostpath"] = "hostpath"
    size: Annotated[str, Field(pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|Pi)$")] = "10Gi"
    mount_path: str


class Storage(_Strict):
    datasets: Volume = Volume(mount_path="/data/datasets")
    checkpoints: Volume = Volume(mount_path="/data/checkpoints")


class Kms(_Strict):
    provider: Literal["softhsm", "aws-kms", "gcp-kms", "azure-keyvault", "vault", "local"] = "local"
    key_id: str = "aidc-lab-key"
    rotation_days: Annotated[int, Field(ge=1, le=3650)] = 90


class Software(_Strict):
    driver_branch: str = "570"
    cuda_version: str = "12.8"
    nccl_version: str = "2.26.2"
    kubernetes_version: str = "1.31"


class BurninPolicy(_Strict):
    # A node more than this fraction below the fleet median fails (robust: median + MAD,
    # see aidc.burnin.judge). Fleet-relative checks are trusted over fixed thresholds.
    fleet_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.25
    gemm_size: Annotated[int, Field(ge=16, le=65536)] = 1024
    allreduce_min_bytes: Annotated[int, Field(ge=4)] = 1024
    allreduce_max_bytes: Annotated[int, Field(ge=4)] = 4 * 1024 * 1024
    train_steps: Annotated[int, Field(ge=2, le=100000)] = 30
    floors: dict[str, float] = {}  # overrides of the GPU model's floors

    @model_validator(mode="after")
    def _sizes(self) -> "BurninPolicy":
        if self.allreduce_min_bytes > self.allreduce_max_bytes:
            raise ValueError("allreduce_min_bytes must not exceed allreduce_max_bytes")
        return self


class Policy(_Strict):
    dry_run: bool = False
    # An int (nodes) or a percentage of all nodes ("25%"), like Kubernetes' maxUnavailable.
    max_unavailable: int | Annotated[str, Field(pattern=r"^[0-9]{1,3}%$")] = 1
    burnin: BurninPolicy = BurninPolicy()
    out_of_service_actions: list[Literal["restart_app", "reset_gpu", "reboot_node", "contact_support"]] = [
        "reset_gpu",
        "reboot_node",
        "contact_support",
    ]
    # Destructive runbook step kinds that may run without a human `approve` step. Quarantine
    # within max_unavailable is the automatic first response; everything else waits for a human.
    runbook_auto_approve: list[Literal["quarantine", "release", "playbook", "burnin"]] = ["quarantine"]

    @field_validator("max_unavailable")
    @classmethod
    def _non_negative(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("max_unavailable must be >= 0")
        return value

    def max_unavailable_nodes(self, total_nodes: int) -> int:
        if isinstance(self.max_unavailable, int):
            return self.max_unavailable
        return math.floor(total_nodes * int(self.max_unavailable[:-1]) / 100)


class Agent(_Strict):
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = 9400
    poll_interval_s: Annotated[float, Field(gt=0, le=300)] = 1.0
    device_timeout_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    kernel_log: str = "/dev/kmsg"


class Lab(_Strict):
    train_steps: Annotated[int, Field(ge=10)] = 120
    inject_at_step: Annotated[int, Field(ge=1)] = 25
    inject_xid: int = 79
    checkpoint_every: Annotated[int, Field(ge=1)] = 1
    base_port: Annotated[int, Field(ge=1024, le=60000)] = 29400


class ClusterSpec(_Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    device_backend: Literal["sim", "nvml"] = "nvml"
    scheduler: Literal["lab", "slurm", "kubernetes"] = "kubernetes"
    node_pools: Annotated[list[NodePool], Field(min_length=1)]
    fabric: Fabric = Fabric()
    storage: Storage = Storage()
    kms: Kms = Kms()
    software: Software = Software()
    policy: Policy = Policy()
    agent: Agent = Agent()
    lab: Lab = Lab()

    @model_validator(mode="after")
    def _unique_pools(self) -> "ClusterSpec":
        names = [p.name for p in self.node_pools]
        if len(set(names)) != len(names):
            raise ValueError(f"node pool names must be unique, got {names}")
        return self

    def nodes(self, include_spares: bool = True) -> list["Node"]:
        out: list[Node] = []
        for pool in self.node_pools:
            out += [Node(f"{pool.name}-{i}", pool.name, pool.gpu_model, pool.gpus_per_node, False)
                    for i in range(pool.count)]
            if include_spares:
                out += [Node(f"{pool.name}-spare-{i}", pool.name, pool.gpu_model, pool.gpus_per_node, True)
                        for i in range(pool.spares)]
        return out

    def floors(self, gpu_model: str) -> dict[str, float]:
        return {**gpu_models()[gpu_model]["floors"], **self.policy.burnin.floors}


@dataclass(frozen=True)
class Node:
    name: str
    pool: str
    gpu_model: str
    gpus: int
    spare: bool


def project_root(start: Path | None = None) -> Path:
    """The directory holding Pulumi.yaml: $AIDC_ROOT, else upwards from cwd, else the checkout."""
    if os.environ.get("AIDC_ROOT"):
        return Path(os.environ["AIDC_ROOT"])
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "Pulumi.yaml").exists():
            return d
    return Path(__file__).resolve().parents[2]


def stack_path(stack: str | os.PathLike) -> Path:
    text = str(stack)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return Path(text)
    return project_root() / f"Pulumi.{text}.yaml"


def _key_path(loc: tuple) -> str:
    out = CONFIG_KEY
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_spec(data: object, file: str = "<memory>") -> ClusterSpec:
    """Validate the `aidc:cluster` value; errors name the file, the key path and what was expected."""
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise SpecError(file, _key_path(tuple(err["loc"])), f"expected {msg}{more}") from None


def load_stack(stack: str | os.PathLike = "lab") -> ClusterSpec:
    """Read `Pulumi.<stack>.yaml` (or a path) and return its validated cluster spec."""
    path = stack_path(stack)
    if not path.exists():
        known = sorted(p.name[len("Pulumi."):-len(".yaml")] for p in path.parent.glob("Pulumi.*.yaml"))
        raise SpecError(str(path), "-", f"a stack file; known stacks here: {', '.join(known) or 'none'}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "-"
        raise SpecError(str(path), where, f"valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise SpecError(str(path), "config", "a mapping named 'config' (a Pulumi stack file)")
    if CONFIG_KEY not in doc["config"]:
        raise SpecError(str(path), f"config.{CONFIG_KEY}", "the cluster spec under this key")
    return parse_spec(doc["config"][CONFIG_KEY], str(path))


