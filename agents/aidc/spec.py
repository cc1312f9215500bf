"""The cluster spec: one typed model read from the stack file `Pulumi.<stack>.yaml`.

The same model feeds the Pulumi program (`infra/`), the Ansible inventory
(`aidc inventory`) and the node agent. It lives under the Pulumi config key
`aidc:cluster`, so `pulumi config get aidc:cluster --json` shows exactly what the
agent sees.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aidc import __version__
from aidc.errors import SpecError
from aidc.identity import IDENTITY_PATTERN
from aidc.shipped import installed_root
from aidc.stack_yaml import StackYamlError, load_stack_yaml, one_line, quote

CONFIG_KEY = "aidc:cluster"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"

# Upper bounds for a real cluster, so that no value in a stack file can make the agent, the burn-in,
# the Pulumi program or an error message handle more than a real cluster needs.
MAX_STACK_BYTES = 1 << 20  # real stack files are a few KiB
# Nodes in all pools together, spares included (800,000 GPUs at 8 a node is 100,000). Sized by
# what the controller was measured to hold (bench/fleet_scale.py, docs/benchmarks.md); nothing
# in the spec, the inventory or the blast radius costs more than linear time in it.
MAX_NODES = 100_000
MAX_BUFFER_BYTES = 8 << 30  # burn-in buffers: the usual nccl-tests sweep ends at 8 GiB (-e 8G)
MAX_VOLUME_BYTES = 1 << 60  # 1 EiB: larger than any parallel filesystem in service
MAX_LISTED_PROBLEMS = 100  # `aidc spec check` lists this many problems of one file, then counts the rest
ShortText = Annotated[str, Field(max_length=256)]  # names, versions, labels, Kubernetes kinds
LongText = Annotated[str, Field(max_length=4096)]  # paths, images, ARNs, command arguments
IfName = Annotated[str, Field(min_length=1, max_length=15)]  # Linux IFNAMSIZ - 1
Labels = Annotated[dict[ShortText, ShortText], Field(max_length=64)]
# Percentages of all nodes, one to three digits (leading zeros allowed, as before): "25%", "100%".
# A pattern rather than a validator, so the JSON Schema (`aidc spec schema`) states the range too;
# above 100% would let more nodes go than exist.
PERCENT_0_100 = r"^([0-9]{1,2}|0[0-9]{2}|100)%$"
PERCENT_1_100 = r"^(0{0,2}[1-9]|0?[1-9][0-9]|100)%$"


def _ip_address(value: str) -> str:
    """An IPv4 or IPv6 address (no name: an agent binds it, a certificate may name it)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"an IP address such as 10.0.0.11, not {value!r}") from None
    return value


@lru_cache(maxsize=1)
def gpu_models() -> dict[str, dict]:
    """The GPU model catalog (versioned data file `data/gpu_models.yaml`)."""
    text = resources.files("aidc").joinpath("data/gpu_models.yaml").read_text()
    return yaml.safe_load(text)["models"]


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt key silently ignored is a misconfigured cluster.
    # NaN/Infinity are never meaningful settings (a NaN floor passes every comparison) and
    # would be printed as non-JSON by `aidc spec show --json`.
    # strict: no coercion between types. YAML `true` is not the integer 1, the string "4" is not a
    # number, and 2.0 is not an integer; what the file says is what the field gets.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class NodePool(_Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    count: Annotated[int, Field(ge=1, le=MAX_NODES)]
    # The JSON Schema lists the catalog's models (read when the schema is made).
    gpu_model: Annotated[str, Field(max_length=256, json_schema_extra=lambda schema: schema.update(
        enum=sorted(gpu_models())))]
    gpus_per_node: Annotated[int, Field(ge=1, le=16)]
    spares: Annotated[int, Field(ge=0, le=1000)] = 0
    # How nodes come to exist: a Karpenter NodePool, a Cluster API MachineDeployment, or
    # "static" (machines that already exist, e.g. the lab or a hand-racked cluster).
    provisioner: Literal["karpenter", "cluster-api", "static"] = "static"
    instance_type: ShortText | None = None
    labels: Labels = {}
    # Cluster API only: the infrastructure provider's machine template kind that the site's
    # tooling creates under the name `<cluster>-<pool>` (group infrastructure.cluster.x-k8s.io).
    machine_template_kind: ShortText = "Metal3MachineTemplate"
    # Management addresses of the pool's machines, one per node in node order (`<pool>-0`.. then
    # `<pool>-spare-0`..): Ansible reaches the node there (the inventory's ansible_host) and the
    # agent's metrics server binds there (agent.listen_address "management"). Empty: none known.
    addresses: Annotated[list[Annotated[str, Field(max_length=45)]], Field(max_length=11000)] = []

    @field_validator("addresses")
    @classmethod
    def _ip_addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            _ip_address(value)
        return values

    @model_validator(mode="after")
    def _one_address_per_node(self) -> "NodePool":
        if self.addresses and len(self.addresses) != self.count + self.spares:
            raise ValueError(f"addresses lists {len(self.addresses)} but the pool has {self.count + self.spares} "
                             "nodes (count + spares), one address each in node order")
        return self

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
    # netns: the lab's fabric, one network namespace per node and a shaped bridge per rail (aidc.lab.fabric).
    kind: Literal["infiniband", "roce", "ethernet", "loopback", "netns"] = "loopback"
    rails: Annotated[int, Field(ge=0, le=32)] = 0
    link_speed_gbps: Annotated[float, Field(gt=0, le=3200)] = 100
    hcas: Annotated[list[ShortText], Field(max_length=32)] = []
    # NCCL_SOCKET_IFNAME: an interface, or a list/prefix expression such as "^docker,lo".
    socket_ifname: ShortText = "lo"
    gid_index: Annotated[int, Field(ge=0, le=255)] | None = None  # the RoCE GID table has 256 entries
    topology_file: LongText | None = None
    # One network interface per rail (the netdev the secondary network attaches to); empty means
    # the conventional names: ib0..ibN-1 on InfiniBand, rail0..railN-1 otherwise.
    rail_ifnames: Annotated[list[IfName], Field(max_length=32)] = []
    # Address space the per-rail IP pools are carved from (one equal subnet per rail).
    ipam_cidr: ShortText = "10.224.0.0/12"

    @field_validator("ipam_cidr")
    @classmethod
    def _ipv4_network(cls, value: str) -> str:
        try:
            ipaddress.IPv4Network(value)
        except ValueError as exc:
            raise ValueError(f"an IPv4 network such as 10.224.0.0/12 ({exc})") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Fabric":
        if self.hcas and len(self.hcas) != self.rails:
            raise ValueError(f"hcas lists {len(self.hcas)} devices but rails is {self.rails}")
        if self.rail_ifnames and len(self.rail_ifnames) != self.rails:
            raise ValueError(f"rail_ifnames lists {len(self.rail_ifnames)} interfaces but rails is {self.rails}")
        if self.kind == "roce" and self.gid_index is None:
            raise ValueError("gid_index is required for RoCE fabrics")
        if self.kind in ("infiniband", "roce", "netns") and self.rails < 1:
            raise ValueError(f"a {self.kind} fabric needs rails >= 1")
        return self


class Volume(_Strict):
    storage_class: Literal["lustre", "nfs", "weka", "gpfs", "local-nvme", "hostpath"] = "hostpath"
    size: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,6}(Ki|Mi|Gi|Ti|Pi)$")] = "10Gi"
    mount_path: LongText
    # The CSI provisioner and StorageClass parameters; None takes the catalog default for
    # storage_class (infra/aidc_infra/data/storage_provisioners.yaml). Site values such as a
    # Lustre filesystem's subnet go in parameters.
    provisioner: ShortText | None = None
    parameters: Labels = {}

    @field_validator("size")
    @classmethod
    def _at_most_an_exbibyte(cls, value: str) -> str:
        if int(value[:-2]) << (10 * ("KMGTP".index(value[-2]) + 1)) > MAX_VOLUME_BYTES:
            raise ValueError(f"a size of at most 1024Pi, not {value!r}")
        return value


class Storage(_Strict):
    datasets: Volume = Volume(mount_path="/data/datasets")
    checkpoints: Volume = Volume(mount_path="/data/checkpoints")


class Pkcs11(_Strict):
    """A PKCS#11 token (an HSM; SoftHSM2 in tests). The PIN never lives in the stack file:
    it is read from the environment variable `pin_env`, or from `pin_file` (mode 0600)."""
    module: LongText = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: Annotated[str, Field(min_length=1, max_length=32)]
    pin_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = "AIDC_PKCS11_PIN"
    pin_file: LongText | None = None


KMS_KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$"


class AwsKms(_Strict):
    """AWS KMS settings (provider aws-kms). Credentials and the endpoint are boto3's own
    (an instance or IRSA role, AWS_ENDPOINT_URL); they never live in the stack file."""
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")] | None = None  # default: the key ARN's
    # The ECC_NIST_P256 signing key (KMS has no Ed25519). Default: the KEK alias + "-signing";
    # required when key_id is a key ARN or id rather than an alias.
    signing_key_id: Annotated[str, Field(pattern=KMS_KEY_ID_PATTERN)] | None = None


class Kms(_Strict):
    # local: a keyring directory on the node; pkcs11: an HSM; aws-kms: AWS KMS. The other cloud
    # providers keep their place in the spec; `aidc spec check` says this build lacks them.
    provider: Literal["local", "pkcs11", "aws-kms", "vault-transit", "gcp-kms", "azure-keyvault"] = "local"
    # Key ids appear in token labels, headers and messages: printable, no spaces (ARNs fit).
    key_id: Annotated[str, Field(pattern=KMS_KEY_ID_PATTERN)] = "aidc-lab-key"
    rotation_days: Annotated[int, Field(ge=1, le=3650)] = 90
    # local only: the keyring directory (None: /var/lib/aidc/keyring; the lab keeps its own
    # under the lab directory).
    keyring: LongText | None = None
    pkcs11: Pkcs11 | None = None
    aws: AwsKms | None = None

    @model_validator(mode="after")
    def _provider_settings(self) -> "Kms":
        if self.provider == "pkcs11" and self.pkcs11 is None:
            raise ValueError("provider pkcs11 needs a pkcs11: section (module, token_label, pin_env or pin_file)")
        if (self.provider == "aws-kms" and "alias/" not in self.key_id
                and (self.aws is None or not self.aws.signing_key_id)):
            raise ValueError("provider aws-kms with a key ARN or id needs aws.signing_key_id (an ECC_NIST_P256 "
                             "SIGN_VERIFY key); with an alias key_id it defaults to the alias + '-signing'")
        return self


MIN_KUBERNETES_MINOR = 30


def _two_digits_at_least(n: int) -> str:
    """A regular expression for the two-digit numbers n..99 (10 <= n <= 99)."""
    tens, units = divmod(n, 10)
    return f"{tens}[{units}-9]" + (f"|[{tens + 1}-9][0-9]" if tens < 9 else "")


class Software(_Strict):
    driver_branch: ShortText = "570"
    cuda_version: ShortText = "12.8"
    nccl_version: ShortText = "2.26.2"
    # The JSON Schema states the minimum minor release as a pattern; the validator says why.
    kubernetes_version: Annotated[str, Field(pattern=r"^1\.[0-9]{2}(\.[0-9]{1,3})?$", json_schema_extra={
        "pattern": rf"^1\.({_two_digits_at_least(MIN_KUBERNETES_MINOR)})(\.[0-9]{{1,3}})?$"})] = "1.31"
    # "host": the driver is installed on the host (Ansible, or the machine image), so the GPU
    # Operator leaves it alone; "operator": the GPU Operator installs driver_branch.
    driver_source: Literal["host", "operator"] = "host"
    # Pinned Helm chart versions; the custom-resource field checks in tests/infra are tied to these.
    gpu_operator_chart: ShortText = "v26.7.0"
    network_operator_chart: ShortText = "26.4.1"

    @field_validator("kubernetes_version")
    @classmethod
    def _binds_agents_to_nodes(cls, value: str) -> str:
        # The agent node-binding admission policy (infra/aidc_infra/agent_binding.py) needs
        # ValidatingAdmissionPolicy v1 and the node name in service account tokens: both 1.30.
        if int(value.split(".")[1]) < MIN_KUBERNETES_MINOR:
            raise ValueError(f"1.{MIN_KUBERNETES_MINOR} or later (agents are bound to their nodes by a "
                             f"ValidatingAdmissionPolicy), not {value!r}")
        return value

    @property
    def kubernetes_minor(self) -> str:
        return ".".join(self.kubernetes_version.split(".")[:2])


class BurninPolicy(_Strict):
    # A node more than this fraction below the fleet median fails (robust: median + MAD,
    # see aidc.burnin.judge). Fleet-relative checks are trusted over fixed thresholds.
    fleet_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.25
    gemm_size: Annotated[int, Field(ge=16, le=65536)] = 1024
    allreduce_min_bytes: Annotated[int, Field(ge=4, le=MAX_BUFFER_BYTES)] = 1024
    allreduce_max_bytes: Annotated[int, Field(ge=4, le=MAX_BUFFER_BYTES)] = 4 * 1024 * 1024
    train_steps: Annotated[int, Field(ge=2, le=100000)] = 30
    # Memory-copy burn-in buffer (bytes copied per pass; bandwidth counts read + write).
    memcpy_bytes: Annotated[int, Field(ge=4096, le=MAX_BUFFER_BYTES)] = 256 * 1024 * 1024
    # Timed repeats per measurement; the median is reported.
    repeats: Annotated[int, Field(ge=1, le=1000)] = 5
    # The DDP run's loss on a fixed batch must fall by at least this fraction.
    min_loss_drop: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Every collective's busbw over the sweep's largest sizes must reach this fraction of the link
    # rate (fabric.link_speed_gbps / 8 GB/s); 0 turns the check off. busbw can exceed the
    # network's rate where ranks share a node (NVLink), but a floor is a fraction below 1.
    min_busbw_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.25
    # A node's collective busbw more than this fraction below the fleet median fails it. Inside
    # a collective ranks wait for each other, so a rank's own time carries every rank's noise.
    busbw_fleet_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.25
    # Checkpoint storage (aidc.burnin.storage) on the spec's checkpoint path: bytes written with
    # fsync and read back per sample, and empty files created, stat'ed and unlinked per sample.
    storage_bytes: Annotated[int, Field(ge=1 << 20, le=MAX_BUFFER_BYTES)] = 256 * 1024 * 1024
    storage_files: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    # Storage is judged against the fleet with its own tolerance: shared volumes vary more than
    # a GPU does, and a node with half the fleet's storage rate is what this is for.
    storage_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # Overrides of the GPU model's floors (TFLOP/s, GB/s: a million is past any GPU).
    floors: Annotated[dict[ShortText, Annotated[float, Field(ge=0, le=1e6)]], Field(max_length=32)] = {}
    # Localise a bad link (ring-neighbour pair tests per rail) when the fleet's largest all_reduce
    # reaches less than this fraction of the link rate (aidc.burnin.localise).
    localise_below_fraction: Annotated[float, Field(gt=0, le=1)] = 0.6
    # `dcgmi diag -r LEVEL` on nodes that have DCGM (1 quick, 2 medium, 3 long, 4 extended);
    # each test's result goes into the certificate (aidc.burnin.dcgm).
    dcgm_diag_level: Annotated[int, Field(ge=1, le=4)] = 1
    # With `aidc burnin run --soak-s N`: a GPU whose SM clock late in the soak is more than this
    # fraction below the clock it reached early fails (aidc.burnin.soak).
    soak_max_clock_sag: Annotated[float, Field(gt=0, lt=1)] = 0.1

    @model_validator(mode="after")
    def _sizes(self) -> "BurninPolicy":
        if self.allreduce_min_bytes > self.allreduce_max_bytes:
            raise ValueError("allreduce_min_bytes must not exceed allreduce_max_bytes")
        # The sweep runs the powers of two in the range; a range without one checks nothing.
        smallest = 1 << (self.allreduce_min_bytes - 1).bit_length()
        if smallest > self.allreduce_max_bytes:
            raise ValueError(f"allreduce_min_bytes..allreduce_max_bytes ({self.allreduce_min_bytes}.."
                             f"{self.allreduce_max_bytes}) holds no power of two: the sweep would be empty")
        return self


class EscalationPolicy(_Strict):
    """When a repeated fault moves one rung up the ladder (restart_app -> reset_gpu ->
    reboot_node -> contact_support), and when a node goes to a person (aidc.failover.remediation).
    A catalog entry's `repeats`/`window_min` override the first two for its XID."""
    # The same fault on the same GPU this many times within window_min: one rung up (2x: two).
    repeats: Annotated[int, Field(ge=2, le=1000)] = 3
    window_min: Annotated[float, Field(gt=0, le=43200)] = 60
    # A sticky fault (catalog `sticky: true`) survives the remediation, so its second sighting
    # in the window already escalates.
    sticky_repeats: Annotated[int, Field(ge=2, le=1000)] = 2
    # Sightings closer together than this are one burst and count once (NVIDIA's practice).
    burst_s: Annotated[float, Field(ge=0, le=86400)] = 60
    # A node remediated (quarantined) this many times in node_window_days goes to a person:
    # its next remediation is contact_support, never another automatic one.
    node_remediations: Annotated[int, Field(ge=1, le=1000)] = 5
    node_window_days: Annotated[float, Field(gt=0, le=365)] = 7


class OffenderPolicy(_Strict):
    """Repeat offenders, the escalation ladder's last rung (aidc.failover.offenders): a GPU (or
    a node, for faults that reach beyond one GPU) whose faults weigh `max_faults` or more within
    `window_days` is marked for repair/RMA, is not returned to service by recertification
    (`aidc failover release`, a runbook's release step) and is cleared only by an approver
    (`aidc failover offender clear`). Each fault counts its catalog `weight` (a fatal XID more
    than a thermal event), once per burst (policy.escalation.burst_s)."""
    max_faults: Annotated[float, Field(gt=0, le=10000)] = 4
    window_days: Annotated[float, Field(gt=0, le=365)] = 30


class BreakerPolicy(_Strict):
    """The failover circuit breaker: more quarantines than this in the window and failover stops
    acting and latches open until a person resets it (`aidc failover breaker reset`)."""
    window_min: Annotated[float, Field(gt=0, le=43200)] = 60
    # An int (quarantines) or a percentage of all nodes ("25%", rounded down, at least 2: one
    # quarantine never trips it, so a small cluster can still replace one node and then another).
    max_quarantines: Annotated[int, Field(ge=1, le=MAX_NODES)] | Annotated[str, Field(pattern=PERCENT_1_100)] = "25%"

    def limit(self, total_nodes: int) -> int:
        if isinstance(self.max_quarantines, int):
            return self.max_quarantines
        return max(2, math.floor(total_nodes * int(self.max_quarantines[:-1]) / 100))
class StragglerPolicy(_Strict):
    """Stragglers while training (aidc.health.stragglers): over `window_steps`, a node whose
    compute is more than `tolerance` above the fleet median and a robust-z outlier, or the rank
    the collective waited for (least wait in `min_wait_share` of the steps, the others waiting
    more than `tolerance` of a step longer). `action`: alert (event, audit, metric; the node
    stays in service) or quarantine (through failover, within max_unavailable)."""
    window_steps: Annotated[int, Field(ge=5, le=10000)] = 20
    tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.05
    min_robust_z: Annotated[float, Field(ge=0, le=1000)] = 3.5
    min_wait_share: Annotated[float, Field(gt=0, le=1)] = 0.75
    # Slow compute may also require the slowest rank of the step in this share of the window's
    # steps (below one half, so two equally slow ranks taking turns are both found). Off by
    # default: see aidc.health.stragglers, "slow compute".
    min_slowest_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    # The verdict must hold this many steps running before the event: a slow part stays slow,
    # interference from other work on a host comes and goes.
    confirm_steps: Annotated[int, Field(ge=1, le=10000)] = 20
    # Slow link (the trainer's link probe): a ring link more than link_tolerance slower than the
    # fleet's, by the median of the last link_window probes; a node with both ring links slow on a rail.
    link_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.3
    link_window: Annotated[int, Field(ge=1, le=1000)] = 5
    action: Literal["alert", "quarantine"] = "alert"


class Policy(_Strict):
    dry_run: bool = False
    # An int (nodes) or a percentage of all nodes ("25%"), like Kubernetes' maxUnavailable.
    max_unavailable: Annotated[int, Field(ge=0, le=MAX_NODES)] | Annotated[str, Field(pattern=PERCENT_0_100)] = 1
    burnin: BurninPolicy = BurninPolicy()
    stragglers: StragglerPolicy = StragglerPolicy()
    out_of_service_actions: Annotated[list[Literal["restart_app", "reset_gpu", "reboot_node", "contact_support"]],
                                      Field(max_length=16)] = [
        "reset_gpu",
        "reboot_node",
        "contact_support",
    ]
    # Destructive runbook step kinds that may run without a human `approve` step. Quarantine
    # within max_unavailable is the automatic first response; everything else waits for a human.
    runbook_auto_approve: Annotated[list[Literal["quarantine", "release", "playbook", "burnin"]],
                                    Field(max_length=16)] = ["quarantine"]
    # Nodes the scheduler itself reports down (Slurm DOWN, Kubernetes NotReady) count towards
    # max_unavailable: they are not training either, so quarantining more would widen the outage.
    count_down_nodes: bool = True
    escalation: EscalationPolicy = EscalationPolicy()
    offenders: OffenderPolicy = OffenderPolicy()
    # GPUs out of service at once (a quarantined node counts all its GPUs, a GPU taken out alone
    # counts one): an int or a percentage of all GPUs. None: as many GPUs as max_unavailable
    # nodes hold (the largest nodes), so the default allows what it allowed before GPUs counted.
    max_unavailable_gpus: Annotated[int, Field(ge=0, le=MAX_NODES * 64)] | \
        Annotated[str, Field(pattern=PERCENT_0_100)] | None = None
    breaker: BreakerPolicy = BreakerPolicy()
    # Events refused for capacity (blast radius, breaker open) stay pending; they are decided
    # again at once when aidc releases a node or a person resets the breaker, and at least this
    # often otherwise (a node an operator returned to service outside aidc).
    deferred_recheck_s: Annotated[float, Field(gt=0, le=3600)] = 10

    def max_unavailable_nodes(self, total_nodes: int) -> int:
        if isinstance(self.max_unavailable, int):
            return self.max_unavailable
        return math.floor(total_nodes * int(self.max_unavailable[:-1]) / 100)

    def max_unavailable_gpu_count(self, gpus_per_node: list[int]) -> int:
        """The GPU blast radius for nodes holding `gpus_per_node` GPUs (policy.max_unavailable_gpus)."""
        if self.max_unavailable_gpus is None:
            return sum(sorted(gpus_per_node, reverse=True)[:self.max_unavailable_nodes(len(gpus_per_node))])
        if isinstance(self.max_unavailable_gpus, int):
            return self.max_unavailable_gpus
        return math.floor(sum(gpus_per_node) * int(self.max_unavailable_gpus[:-1]) / 100)


# The repository the root Dockerfile's image is pushed to (its build line names it too).
AGENT_IMAGE_REPOSITORY = "ghcr.io/aidc-project/aidc-agent"
# The repository Dockerfile.burnin's image (the agent and burnin extras, CUDA torch) is pushed to.
BURNIN_IMAGE_REPOSITORY = "ghcr.io/aidc-project/aidc-burnin"


CertNameText = Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")]


# The agent's default metrics port: beside dcgm-exporter's 9400, which the GPU Operator deploys.
AGENT_METRICS_PORT = 9402


class Agent(_Strict):
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = AGENT_METRICS_PORT
    # "present" when dcgm-exporter runs on the nodes too (the GPU Operator deploys it): the agent
    # then leaves the DCGM_FI_* series dcgm-exporter exports by default to it (docs/metrics.md).
    dcgm_exporter: Literal["absent", "present"] = "absent"
    poll_interval_s: Annotated[float, Field(gt=0, le=300)] = 1.0
    device_timeout_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    kernel_log: LongText = "/dev/kmsg"
    # The agent's container image and entry point on Kubernetes (infra/ deploys it as a DaemonSet,
    # and the failover controller's Deployment runs the same image): what the Dockerfile at the
    # repository root builds, tagged with this package's version.
    image: LongText = f"{AGENT_IMAGE_REPOSITORY}:{__version__}"
    # The program; infra/ appends the flags derived from this spec (node, backend, store, port...).
    command: Annotated[list[LongText], Field(min_length=1, max_length=64)] = ["aidc", "agent", "run"]
    # Labels on the agent's ServiceMonitor, for the Prometheus that selects monitors by label
    # (kube-prometheus-stack: `release: <its Helm release name>`).
    service_monitor_labels: Annotated[dict[Annotated[str, Field(max_length=253)], Annotated[str, Field(max_length=63)]],
                                      Field(max_length=16)] = {}
    # Outside Kubernetes (the aidc_agent role's unit): the address the metrics server binds,
    # "management" (the node's management address: its pool's `addresses`, or the inventory's
    # aidc_management_address) or an IP address (0.0.0.0: every interface).
    listen_address: ShortText = "management"
    # Where the agent forwards its fault events (HTTPS, mutual TLS, the certificate and key the
    # role installs): https://HOST:PORT; None: the first `controller.hosts` entry's events port,
    # or nowhere when there is none (a controller on the same host reads the store itself).
    controller_url: LongText | None = None
    # /metrics over HTTPS with the node's certificate ("tls"), and only for scrapers with a
    # client certificate from the site's CA ("mutual"); "off": plain HTTP.
    metrics_tls: Literal["off", "tls", "mutual"] = "off"

    @field_validator("listen_address")
    @classmethod
    def _management_or_ip(cls, value: str) -> str:
        return value if value == "management" else _ip_address(value)

    @field_validator("controller_url")
    @classmethod
    def _https_url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is None:
            return value
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "https" or not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"https://HOST:PORT (events travel only over mutual TLS), not {value!r}")
        return value


class ControllerHost(_Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    address: Annotated[str, Field(max_length=45)]

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        return _ip_address(value)


class Controller(_Strict):
    """The failover controller and the runbook receiver on a host of their own, for sites without
    Kubernetes (the aidc_controller role; Kubernetes runs the controller as a Deployment)."""
    # The machines (the inventory's `aidc_controllers` group); one acts at a time (the lease).
    hosts: Annotated[list[ControllerHost], Field(max_length=5)] = []
    # `aidc failover run --listen ADDRESS:PORT`: the agents' fault events (HTTPS, mutual TLS).
    events_port: Annotated[int, Field(ge=1, le=65535)] = 9443
    # `aidc failover run --metrics-port`: the controller's own metrics, /healthz and /readyz.
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = 9403
    # `aidc runbook serve --port`: Alertmanager's webhook (HTTPS, mutual TLS).
    runbook_port: Annotated[int, Field(ge=1, le=65535)] = 9097
    # The certificate name Alertmanager presents to the runbook receiver (its client certificate).
    alertmanager_client: CertNameText = "alertmanager"

    @model_validator(mode="after")
    def _distinct(self) -> "Controller":
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"controller host names must be unique, got {names}")
        ports = [self.events_port, self.metrics_port, self.runbook_port]
        if len(set(ports)) != 3:
            raise ValueError(f"events_port, metrics_port and runbook_port must differ, got {ports}")
        return self


class SlurmBurnin(_Strict):
    """Where `aidc burnin run` puts its one Slurm job (aidc.burnin.launch.slurm)."""
    # sbatch/srun --partition and --reservation; None: the cluster's default partition, no reservation.
    partition: ShortText | None = None
    reservation: ShortText | None = None
    # The address the command's rendezvous store listens on, one every node reaches (the launching
    # host's address on the job's network); None: 127.0.0.1, a Slurm on this machine (the lab's).
    store_host: ShortText | None = None


class Slurm(_Strict):
    """How aidc reaches an existing Slurm cluster (`scheduler: slurm`)."""
    # The slurm.conf Slurm's client tools read (exported to them as SLURM_CONF); None: the
    # compiled-in default (/etc/slurm/slurm.conf on Debian).
    conf: LongText | None = None
    # Where scontrol, sinfo, squeue and scancel live; None: found on PATH.
    bin_dir: LongText | None = None
    # Seconds one Slurm client call may take before it counts as failed.
    command_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    # slurm.conf HealthCheckInterval / HealthCheckNodeState for `aidc health check`
    # (set by the slurm_node role; 0 turns the periodic check off).
    health_check_interval_s: Annotated[int, Field(ge=0, le=86400)] = 300
    health_check_node_state: Literal["ANY", "IDLE", "ALLOC", "MIXED", "NONDRAINED_IDLE", "CYCLE"] = "ANY"
    burnin: SlurmBurnin = SlurmBurnin()


class KubernetesBurnin(_Strict):
    """Where `aidc burnin run` puts its Jobs, one per node (aidc.burnin.launch.kubernetes)."""
    # The address the command's rendezvous store listens on, one every burn-in pod reaches (the
    # launching host's or pod's address on the cluster network); None: $POD_IP when the command
    # runs in a pod (the downward API's status.podIP), else the run is refused.
    store_host: ShortText | None = None
    # The image the Jobs run: aidc installed with the `burnin` extra and a CUDA torch. The default is
    # what Dockerfile.burnin builds (`make image-burnin`); agent.image has no torch.
    image: LongText = f"{BURNIN_IMAGE_REPOSITORY}:{__version__}"


class CloudNativePG(_Strict):
    """A CloudNativePG `Cluster` (postgresql.cnpg.io/v1) infra/ creates for the state database,
    in the controller's namespace (the CloudNativePG operator must be installed). The controller
    pods read its DSN from the operator's `<name>-app` Secret, key `uri`, as $state.dsn_env."""
    name: Annotated[str, Field(pattern=DNS_LABEL)] = "aidc-state"
    instances: Annotated[int, Field(ge=1, le=9)] = 3  # one primary, the rest replicas it fails over to
    storage_size: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,6}(Mi|Gi|Ti)$")] = "10Gi"
    storage_class: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")] | None = None
    # The PostgreSQL image (15 or newer), by tag or digest; None: the operator's default.
    image: LongText | None = None


class Kubernetes(_Strict):
    """How aidc acts on a Kubernetes cluster (`scheduler: kubernetes`)."""
    # A kubeconfig for the controller outside the cluster; None: in-cluster credentials in a
    # pod, else $KUBECONFIG or ~/.kube/config.
    kubeconfig: LongText | None = None
    # Where the controller keeps its leader-election Lease and writes its Events.
    namespace: Annotated[str, Field(pattern=DNS_LABEL)] = "aidc-system"
    lease_name: Annotated[str, Field(pattern=DNS_LABEL)] = "aidc-failover-controller"
    # A leader that has not renewed its Lease for this long is replaced; it stops acting
    # on its own as soon as it cannot renew within renew_deadline_s.
    lease_duration_s: Annotated[int, Field(ge=5, le=300)] = 15
    renew_deadline_s: Annotated[int, Field(ge=2, le=300)] = 10
    retry_period_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # The quarantine taint's effect: NoSchedule keeps running pods (they are evicted through
    # the Eviction API, which honours PodDisruptionBudgets); NoExecute also removes pods
    # that do not tolerate it, without asking their budgets.
    quarantine_taint_effect: Literal["NoSchedule", "NoExecute"] = "NoSchedule"
    # How long evictions refused by a PodDisruptionBudget (HTTP 429) are retried before the
    # quarantine reports the pods it could not evict.
    eviction_timeout_s: Annotated[float, Field(ge=0, le=3600)] = 60.0
    # Take the spare taint off one healthy spare for every quarantined node, and put it back
    # when that node is released.
    promote_spares: bool = True
    # Failover controller replicas (infra/ deploys them; one leads through the Lease).
    controller_replicas: Annotated[int, Field(ge=1, le=5)] = 2
    burnin: KubernetesBurnin = KubernetesBurnin()
    # state.backend postgres: the Secret in `namespace` whose key holds the DSN, given to the
    # controller pods as $state.dsn_env (ignored with cloudnative_pg, whose operator writes one).
    state_secret: Annotated[str, Field(pattern=DNS_LABEL)] = "aidc-state-dsn"
    state_secret_key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]{1,253}$")] = "dsn"
    cloudnative_pg: CloudNativePG | None = None
    # How the cluster hands out GPUs, which decides whether failover can take one GPU out:
    # `dra` (a DRA driver publishes each GPU as a device: a DeviceTaintRule keeps pods off that
    # one device) or `device_plugin` (the classic plugin: only the plugin itself can mark a GPU
    # unhealthy, and only for new pods, so a fault local to one GPU quarantines the node).
    gpu_allocation: Literal["dra", "device_plugin"] = "device_plugin"
    # With `dra`: the driver's name and its device names (pool = the node's name, as NVIDIA's
    # DRA driver publishes its ResourceSlices); `{index}` is the GPU's index on its node.
    dra_driver: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")] = "gpu.nvidia.com"
    dra_device_name: Annotated[str, Field(pattern=r"^[a-z0-9-]{0,40}\{index\}[a-z0-9-]{0,20}$")] = "gpu-{index}"

    @model_validator(mode="after")
    def _lease_timing(self) -> "Kubernetes":
        if not self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("retry_period_s < renew_deadline_s < lease_duration_s (as client-go's leader election)")
        return self


class Lab(_Strict):
    train_steps: Annotated[int, Field(ge=10, le=100000)] = 120
    inject_at_step: Annotated[int, Field(ge=1, le=100000)] = 25
    inject_xid: Annotated[int, Field(ge=1, le=999)] = 79  # NVIDIA Xid codes are 1..~160
    checkpoint_every: Annotated[int, Field(ge=1, le=100000)] = 1
    base_port: Annotated[int, Field(ge=1024, le=60000)] = 29400
    # One training rank per node (its GPUs together), or one per GPU: then a fault local to one
    # GPU takes that GPU's rank out and the node's other ranks keep training (aidc lab run
    # --ranks gpu). gpu_inject_xid is the fault the lab injects then: one that stays in one GPU.
    ranks: Literal["node", "gpu"] = "node"
    gpu_inject_xid: Annotated[int, Field(ge=1, le=999)] = 48
    # What one rail of the netns fabric is shaped to on this machine (Mbit/s): the spec's
    # link_speed_gbps scaled to what a few shared cores carry (gloo measured ~0.6-1 Gbit/s over
    # veths here, unshaped), so the shaping, not the CPU, sets the rate.
    fabric_rail_mbit: Annotated[float, Field(gt=0, le=100000)] = 200


class Access(_Strict):
    """Roles per authenticated identity (aidc.identity): `user:<os user>`, `cert:<CN>`,
    `token:<name>`. Empty: nothing enforced. Tokens are never here: the receiver's token map
    file holds their SHA-256 digests."""
    roles: Annotated[dict[Annotated[str, Field(pattern=IDENTITY_PATTERN)],
                          Literal["viewer", "operator", "approver"]], Field(max_length=1024)] = {}


NODE_RANGE = re.compile(r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9_.-]*)\[(?P<first>[0-9]{1,6})-(?P<last>[0-9]{1,6})\]$")


def expand_node_ranges(entries: list[str]) -> list[str]:
    """Node names, with each `PREFIX[A-B]` entry standing for PREFIXA .. PREFIXB (A <= B, at most
    MAX_NODES names in all): the form of the spec's derived names (`gpu-0`, `gpu-spare-3`)."""
    names: list[str] = []
    for entry in entries:
        match = NODE_RANGE.match(entry)
        if match is None:
            names.append(entry)
            continue
        first, last = int(match["first"]), int(match["last"])
        if first > last or len(names) + last - first + 1 > MAX_NODES:
            raise ValueError(f"{entry!r}: a range [A-B] with A <= B, naming at most {MAX_NODES} nodes in all")
        names += [f"{match['prefix']}{i}" for i in range(first, last + 1)]
    return names


CertName = CertNameText


class Transport(_Strict):
    """Who may report faults for whom over the controller's HTTPS listener (aidc.transport.ingest).
    An agent's certificate names its node and speaks for that node only; a relay (a certificate
    name the controller admits with `--allow-client`) speaks for exactly the nodes listed for it
    here, never for the whole cluster (aidc.failover.provenance)."""
    relays: Annotated[dict[CertName, Annotated[list[Annotated[str, Field(max_length=253)]],
                                               Field(min_length=1, max_length=MAX_NODES)]],
                      Field(max_length=1024)] = {}

    @field_validator("relays")
    @classmethod
    def _expand_ranges(cls, relays: dict[str, list[str]]) -> dict[str, list[str]]:
        # A rack's relay at fleet scale speaks for thousands of nodes: `gpu-[0-4999]` names them
        # in one entry (a stack file stays a few KiB at 100,000 nodes); the lists hold names.
        return {relay: expand_node_ranges(entries) for relay, entries in relays.items()}


class NotifyTarget(_Strict):
    """Where a runbook's `notify` step also goes (aidc.runbook.notifiers): Slack (incoming
    webhook) or PagerDuty (Events API v2). The secret (webhook URL, routing key) comes from the
    environment variable `secret_env` or the 0600 file `secret_file`, never from this file."""
    kind: Literal["slack", "pagerduty"]
    secret_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    secret_file: LongText | None = None
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)] | None = None  # PagerDuty's endpoint
    min_severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _has_a_secret_source(self) -> "NotifyTarget":
        if not self.secret_env and not self.secret_file:
            raise ValueError(f"a {self.kind} target needs secret_env or secret_file (the "
                             f"{'webhook URL' if self.kind == 'slack' else 'routing key'} is a secret)")
        if self.url and self.kind == "slack":
            raise ValueError("a slack target's URL is its secret: give it through secret_env or secret_file")
        return self


def dsn_has_password(dsn: str) -> bool:
    """Whether a libpq DSN (key/value or URI form) carries a password."""
    if re.match(r"^postgres(ql)?://", dsn):
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(dsn)
        return parts.password is not None or "password" in {k.lower() for k in parse_qs(parts.query)}
    return re.search(r"(^|\s)password\s*=", dsn, re.IGNORECASE) is not None


class State(_Strict):
    """Where the controller and the runbook engine keep their state (aidc.state): `sqlite`, the
    embedded default (one host), or `postgres` (15+), shared by every controller replica. The
    DSN comes from exactly one of `dsn`, `dsn_file` (a 0600 file) or `dsn_env` (an environment
    variable). A password is refused in `dsn`: the stack file is committed and `pulumi config`
    shows it; put a password in dsn_file/dsn_env, or use a ~/.pgpass, a client certificate or
    peer authentication on a Unix socket."""
    backend: Literal["sqlite", "postgres"] = "sqlite"
    dsn: LongText | None = None
    dsn_file: LongText | None = None
    dsn_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None

    @field_validator("dsn")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is not None and dsn_has_password(value):
            raise ValueError("a DSN without a password (give the password through dsn_file or dsn_env, "
                             "or ~/.pgpass): the stack file is not a place for secrets")
        return value

    @model_validator(mode="after")
    def _one_dsn_source(self) -> "State":
        given = [k for k in ("dsn", "dsn_file", "dsn_env") if getattr(self, k) is not None]
        if self.backend == "sqlite" and given:
            raise ValueError(f"backend sqlite takes no {given[0]} (its database is a file on the controller's host)")
        if self.backend == "postgres" and len(given) != 1:
            raise ValueError("backend postgres needs exactly one of dsn, dsn_file, dsn_env"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class ClusterSpec(_Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    device_backend: Literal["sim", "nvml"] = "nvml"
    scheduler: Literal["lab", "slurm", "kubernetes"] = "kubernetes"
    node_pools: Annotated[list[NodePool], Field(min_length=1, max_length=64)]
    fabric: Fabric = Fabric()
    storage: Storage = Storage()
    kms: Kms = Kms()
    software: Software = Software()
    policy: Policy = Policy()
    agent: Agent = Agent()
    slurm: Slurm = Slurm()
    kubernetes: Kubernetes = Kubernetes()
    lab: Lab = Lab()
    access: Access = Access()
    transport: Transport = Transport()
    notify: Annotated[list[NotifyTarget], Field(max_length=16)] = []
    state: State = State()
    controller: Controller = Controller()

    @field_validator("node_pools")
    @classmethod
    def _total_nodes(cls, pools: list[NodePool]) -> list[NodePool]:
        # Checked before the node names are listed (nodes()), which costs one object per node.
        total = sum(p.count + p.spares for p in pools)
        if total > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes in all pools together (spares included), not {total}")
        return pools

    @model_validator(mode="after")
    def _unique_pools(self) -> "ClusterSpec":
        names = [p.name for p in self.node_pools]
        if len(set(names)) != len(names):
            raise ValueError(f"node pool names must be unique, got {names}")
        # Node names are derived (`<pool>-<i>`, `<pool>-spare-<i>`), so distinct pools can still
        # collide, e.g. pool `gpu` with spares and pool `gpu-spare`; one name must be one machine.
        owner: dict[str, str] = {}
        for node in self.nodes():
            if node.name in owner:
                raise ValueError(f"unique node names, but {node.name!r} comes from both pool {owner[node.name]!r} "
                                 f"and pool {node.pool!r}; rename one pool")
            owner[node.name] = node.pool
        return self

    @model_validator(mode="after")
    def _unique_machines(self) -> "ClusterSpec":
        nodes = {n.name for n in self.nodes()}
        for host in self.controller.hosts:
            if host.name in nodes:
                raise ValueError(f"controller host {host.name!r} is also a node's name; name it apart")
        seen: dict[str, str] = {}
        named = [(n.name, a) for p in self.node_pools for n, a in zip(self._pool_nodes(p), p.addresses)]
        for name, address in named + [(h.name, h.address) for h in self.controller.hosts]:
            key = str(ipaddress.ip_address(address))
            if key in seen:
                raise ValueError(f"one address per machine, but {address} is given to both {seen[key]} and {name}")
            seen[key] = name
        return self

    @model_validator(mode="after")
    def _relays_list_nodes_of_this_cluster(self) -> "ClusterSpec":
        if self.transport.relays:
            known = {n.name for n in self.nodes()}
            for relay, nodes in self.transport.relays.items():
                unknown = sorted(set(nodes) - known)
                if unknown:
                    raise ValueError(f"transport.relays.{relay} lists {', '.join(map(repr, unknown[:5]))}, "
                                     f"not a node of this cluster")
        return self

    @model_validator(mode="after")
    def _controller_pods_read_the_dsn_from_a_secret(self) -> "ClusterSpec":
        if self.scheduler != "kubernetes":
            return self
        if self.kubernetes.cloudnative_pg is not None and (self.state.backend != "postgres" or not self.state.dsn_env):
            raise ValueError("kubernetes.cloudnative_pg holds the state database: it needs state.backend postgres "
                             "with state.dsn_env (set from the Cluster's <name>-app Secret)")
        if self.state.backend == "postgres" and self.state.dsn_file:
            # A Secret volume's files are root's, readable by the non-root controller only through
            # their group, and aidc refuses a group-readable DSN file.
            raise ValueError("state.dsn_file cannot reach the controller pods of scheduler kubernetes (a mounted "
                             "Secret is group-readable, which aidc refuses for a DSN file): use state.dsn_env, "
                             "set from the Secret kubernetes.state_secret")
        return self

    @model_validator(mode="after")
    def _cluster_api_needs_patch_version(self) -> "ClusterSpec":
        # A Cluster API machine runs an exact Kubernetes release (v1.33.4), not a minor line.
        if any(p.provisioner == "cluster-api" for p in self.node_pools) and \
                self.software.kubernetes_version.count(".") != 2:
            raise ValueError(f"software.kubernetes_version with a patch release (e.g. 1.33.4) for "
                             f"cluster-api pools, not {self.software.kubernetes_version!r}")
        return self

    def nodes(self, include_spares: bool = True) -> list["Node"]:
        out: list[Node] = []
        for pool in self.node_pools:
            out += [n for n in self._pool_nodes(pool) if include_spares or not n.spare]
        return out

    @staticmethod
    def _pool_nodes(pool: NodePool) -> list["Node"]:
        """The pool's nodes in node order (workers, then spares), each with its management address."""
        names = [(f"{pool.name}-{i}", False) for i in range(pool.count)] + \
                [(f"{pool.name}-spare-{i}", True) for i in range(pool.spares)]
        addresses = pool.addresses or [None] * len(names)
        return [Node(name, pool.name, pool.gpu_model, pool.gpus_per_node, spare, address)
                for (name, spare), address in zip(names, addresses)]

    def agent_controller_url(self) -> str | None:
        """Where agents forward their events: agent.controller_url, else the first controller host."""
        if self.agent.controller_url or not self.controller.hosts:
            return self.agent.controller_url
        address = ipaddress.ip_address(self.controller.hosts[0].address)
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"https://{host}:{self.controller.events_port}"

    def floors(self, gpu_model: str) -> dict[str, float]:
        return {**gpu_models()[gpu_model]["floors"], **self.policy.burnin.floors}


JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def cluster_json_schema(stack_file: bool = False) -> dict:
    """The JSON Schema (draft 2020-12) of the `aidc:cluster` value, made from ClusterSpec; with
    `stack_file`, of a whole Pulumi.<stack>.yaml holding it (for an editor's YAML support).

    It states every field's type, bounds, pattern and choices, unknown keys included; what it
    cannot state (relations between fields, derived node names, totals, an IPv4 network's host
    bits, NaN in YAML) only `aidc spec check` finds (tests/test_spec_schema.py lists them)."""
    schema = ClusterSpec.model_json_schema(mode="validation")
    _key_patterns_as_property_names(schema)
    defs = schema.pop("$defs")
    cluster = {**schema, "title": CONFIG_KEY,
               "description": "The aidc cluster spec (aidc.spec.ClusterSpec), aidc " + __version__}
    if not stack_file:
        return {"$schema": JSON_SCHEMA_DIALECT, **cluster, "$defs": defs}
    # A stack file carries other keys (secretsprovider, encryptedkey, other config): left open.
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "Pulumi.<stack>.yaml with aidc:cluster", "type": "object",
            "required": ["config"], "properties": {"config": {
                "type": "object", "required": [CONFIG_KEY], "properties": {CONFIG_KEY: cluster}}},
            "$defs": defs}


def _key_patterns_as_property_names(node: object) -> None:
    """Pydantic writes a mapping whose keys have a pattern as `patternProperties` alone, which lets
    any other key through; the model refuses them, so: propertyNames + additionalProperties."""
    if isinstance(node, list):
        for child in node:
            _key_patterns_as_property_names(child)
        return
    if not isinstance(node, dict):
        return
    for child in node.values():
        _key_patterns_as_property_names(child)
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in node:
        ((pattern, value),) = patterns.items()
        del node["patternProperties"]
        node["propertyNames"] = {**node.get("propertyNames", {}), "pattern": pattern}
        node["additionalProperties"] = value


@dataclass(frozen=True)
class Node:
    name: str
    pool: str
    gpu_model: str
    gpus: int
    spare: bool
    address: str | None = None  # the management address (its pool's `addresses`), if listed


def project_root(start: Path | None = None) -> Path:
    """The directory holding Pulumi.yaml: $AIDC_ROOT, else upwards from cwd, else the checkout,
    else the example project the installed package carries (aidc.shipped)."""
    if os.environ.get("AIDC_ROOT"):
        return Path(os.environ["AIDC_ROOT"])
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "Pulumi.yaml").exists():
            return d
    return installed_root()


def stack_path(stack: str | os.PathLike) -> Path:
    text = str(stack)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return Path(text)
    return project_root() / f"Pulumi.{text}.yaml"


# Pydantic names the union branch it tried in the error location (`int`, `constrained-str`,
# `function-after[...]`); those are not keys in the stack file, so they are left out.
_UNION_BRANCH = re.compile(r"^(int|str|float|bool|constrained-\w+|function-\w+\[.*\])$")
_UNION_FIELDS = {"max_unavailable": "an integer >= 0 or a percentage 0-100%",
                 "max_unavailable_gpus": "an integer >= 0, a percentage 0-100% or null",
                 "max_quarantines": "an integer >= 1 or a percentage 1-100%"}
# What a field of each type takes, in the stack file's words rather than Python's.
_TYPE_WANTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
                "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
                "model_type": "a mapping"}
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")


def _key_path(loc: tuple) -> str:
    out = CONFIG_KEY
    for i, part in enumerate(loc):
        if i and isinstance(part, str) and loc[i - 1] in _UNION_FIELDS and _UNION_BRANCH.match(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:  # a key from the file: quoted (and cut short) unless it is plain text
            out += f".{part}" if isinstance(part, str) and _PLAIN_KEY.fullmatch(part) else f".{quote(part)}"
    return out


def _given(value: object) -> str:
    """The value a field was given, as the stack file would spell it, cut short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return f"the string {quote(value)}" if isinstance(value, str) else quote(value)


def _expected(err: dict) -> str:
    """What one pydantic error says the field takes, in the stack file's words."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (misspelt?)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "finite_number":
        msg = "a finite number (not NaN or infinity)"
    elif err["type"] in _TYPE_WANTED:
        msg = f"{_TYPE_WANTED[err['type']]}, not {_given(err['input'])}"
    elif err["type"] != "value_error":
        msg = f"{msg}, not {_given(err['input'])}"
    # A union field gives one error per branch; say what the field accepts as a whole.
    for name, wanted in _UNION_FIELDS.items():
        if name in err["loc"][:-1] and err["loc"][-1] != name:
            msg = f"{wanted}, not {_given(err['input'])}"
    return one_line(f"expected {msg}", 300)


def parse_spec(data: object, file: str = "<memory>") -> ClusterSpec:
    """Validate the `aidc:cluster` value; errors name the file, the key path and what was expected.

    The SpecError's message is the first problem; its `problems` list them all (up to
    MAX_LISTED_PROBLEMS), one per key path, so a union's per-branch errors count once."""
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        problems: dict[str, str] = {}
        for err in exc.errors(include_url=False):
            key = _key_path(tuple(err["loc"]))
            if key not in problems:
                problems[key] = _expected(err) if len(problems) < MAX_LISTED_PROBLEMS else ""
        listed = [(key, expected) for key, expected in problems.items() if expected]
        key, expected = listed[0]
        more = f" (and {len(problems) - 1} more problem(s): `aidc spec check` lists them)" if len(problems) > 1 else ""
        raise SpecError(file, key, one_line(expected + more, 300), listed, len(problems)) from None


def parse_stack_text(text: str, file: str = "<memory>") -> ClusterSpec:
    """The cluster spec in the text of a stack file (YAML), read by aidc.stack_yaml's rules."""
    try:
        doc = load_stack_yaml(text)
    except StackYamlError as exc:
        raise SpecError(file, f"line {exc.line}" if exc.line else "-", exc.expected) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise SpecError(file, "config", "a mapping named 'config' (a Pulumi stack file)")
    if CONFIG_KEY not in doc["config"]:
        raise SpecError(file, f"config.{CONFIG_KEY}", "the cluster spec under this key")
    return parse_spec(doc["config"][CONFIG_KEY], file)


def load_stack(stack: str | os.PathLike = "lab") -> ClusterSpec:
    """Read `Pulumi.<stack>.yaml` (or a path) and return its validated cluster spec."""
    path = stack_path(stack)
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. ENAMETOOLONG: not a usable path at all
        raise SpecError(str(path)[:200], "-", f"a readable stack file ({exc.strerror})") from None
    if not exists:
        known = sorted(p.name[len("Pulumi."):-len(".yaml")] for p in path.parent.glob("Pulumi.*.yaml"))
        # The README's examples name a stack `prod` that the reader creates first: say how.
        raise SpecError(str(path), "-", f"a stack file; known stacks here: {', '.join(known) or 'none'}. "
                        f"Create it from an example: cp Pulumi.h100-example.yaml {path.name} "
                        f"and edit it (then `aidc spec check --stack {stack}`)")
    try:
        with path.open("rb") as stream:  # read at most one byte past the limit: /dev/zero never ends
            raw = stream.read(MAX_STACK_BYTES + 1)
    except OSError as exc:  # a directory, unreadable, ...
        raise SpecError(str(path), "-", f"a readable stack file ({exc.strerror or exc})") from None
    if len(raw) > MAX_STACK_BYTES:
        raise SpecError(str(path), "-", f"a stack file of at most {MAX_STACK_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), "-", f"a UTF-8 text file (byte {exc.start} is not UTF-8)") from None
    return parse_stack_text(text, str(path))
