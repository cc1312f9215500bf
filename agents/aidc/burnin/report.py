"""What a burn-in run returns: per-node figures and verdicts, and the fleet's view."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from aidc.burnin.suite import ALL as ALL_TESTS

# Units of every judged metric, so each figure is printed with its unit.
UNITS = {
    "gemm_fp32_tflops": "TFLOP/s",
    "gemm_bf16_tflops": "TFLOP/s",
    "memcpy_gbps": "GB/s",
    "allreduce_busbw_gbps": "GB/s",
    "allgather_busbw_gbps": "GB/s",
    "reducescatter_busbw_gbps": "GB/s",
    "broadcast_busbw_gbps": "GB/s",
    "alltoall_busbw_gbps": "GB/s",
    "storage_write_gbps": "GB/s",
    "storage_read_gbps": "GB/s",
    "storage_metadata_ops": "ops/s",
}


@dataclass
class NodeResult:
    node: str
    gpu_model: str
    spare: bool
    # Node figures: the worst GPU of the node (one bad GPU makes a bad node).
    metrics: dict[str, float] = field(default_factory=dict)
    gpus: list[dict] = field(default_factory=list)  # per-GPU GEMM and memcpy results
    training: dict = field(default_factory=dict)  # the DDP run: loss_before/after, steps, param_digest
    parallel: dict[str, dict] = field(default_factory=dict)  # "fsdp", "pipeline": the same fields
    # Per collective, this node's sweep rows (bytes, algbw_gbps, busbw_gbps, link_fraction, correct),
    # timed on this node's own clock.
    collectives: dict[str, list[dict]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # measurements that raised (device errors)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)  # one per failed check
    notes: list[str] = field(default_factory=list)  # checks skipped and why (never silent)
    robust_z: dict[str, float | None] = field(default_factory=dict)  # per metric, vs the fleet
    # GPU indices that failed by themselves (wrong known answers, a failed DCGM test): the SDC
    # verdict names the GPU, not only the node.
    failed_gpus: list[int] = field(default_factory=list)
    # `dcgmi diag` on this node (aidc.burnin.dcgm.run_diag): {"present": False, "note"} without it.
    dcgm: dict = field(default_factory=dict)
    # With --soak-s: {"seconds", "samples", "series": {"<gpu>": [{t, sm_clock_mhz, temperature_c,
    # power_w, throttle_reasons}]}} (aidc.burnin.soak).
    soak: dict = field(default_factory=dict)
    # The burn-in tests this node ran (aidc.burnin.suite): a runbook's recertification runs those
    # its step lists; what they do not cover is neither measured nor judged.
    tests: list[str] = field(default_factory=lambda: list(ALL_TESTS))

    def to_dict(self) -> dict:
        return asdict(self)

    def run(self, mode: str) -> dict:
        """The training run of `mode` ("ddp", "fsdp", "pipeline"), {} when it did not report."""
        return self.training if mode == "ddp" else self.parallel.get(mode, {})

    def step_time_ms(self, mode: str) -> float | None:
        return self.run(mode).get("step_time_ms")


@dataclass
class BurninReport:
    stack: str
    nodes: dict[str, NodeResult]
    fleet: dict  # medians, MADs, tolerance, collective sweeps, world size, link rate, step times
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.nodes) and all(n.passed for n in self.nodes.values())

    @property
    def certified_nodes(self) -> list[str]:
        return [name for name, n in self.nodes.items() if n.passed]

    @property
    def failed_nodes(self) -> list[str]:
        return [name for name, n in self.nodes.items() if not n.passed]

    @property
    def verdicts(self) -> dict[str, str]:
        return {name: "pass" if n.passed else "fail" for name, n in self.nodes.items()}

    @property
    def reasons(self) -> dict[str, list[str]]:
        return {name: list(n.reasons) for name, n in self.nodes.items()}

    def to_dict(self) -> dict:
        return {
            "stack": self.stack,
            "passed": self.passed,
            "certified_nodes": self.certified_nodes,
            "failed_nodes": self.failed_nodes,
            "verdicts": self.verdicts,
            "reasons": self.reasons,
            # One object per node, in spec order (a list since the Slurm launcher: see CHANGELOG.md).
            "nodes": [_node_entry(name, n) for name, n in self.nodes.items()],
            # The sweeps as nccl-tests reports them (the slowest rank's time), beside the link rate.
            "collectives": self.fleet.get("collectives", {}),
            "link_rate_gbps": self.fleet.get("link_rate_gbps"),
            "step_time_ms": self.fleet.get("step_time_ms", {}),
            "fleet": {k: v for k, v in self.fleet.items() if k != "collectives"},
            "units": UNITS,
            "duration_s": round(self.duration_s, 3),
        }


def _node_entry(name: str, n: NodeResult) -> dict:
    return {"node": name, "verdict": "pass" if n.passed else "fail", **n.to_dict()}
