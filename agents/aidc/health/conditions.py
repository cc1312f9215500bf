"""Faults that are states, not lines: derived from telemetry, and remembered across restarts.

A condition is active while the telemetry shows it (a pending row remap, a link down,
thermal slowdown, a lost GPU, a hung driver). The agent emits a fault event when a
condition becomes active, or when its value worsens while active (another double-bit
error, another link down), and records a clearance when it goes away. Conditions are
persisted in the store, so a restarted agent neither reports a standing condition again
nor forgets it and calls the node healthy (a known complaint about other monitors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from aidc.device.base import GpuTelemetry
from aidc.device.nvml import THERMAL_REASONS
from aidc.events import FaultKind


@dataclass(frozen=True)
class Observed:
    """A condition as one telemetry sample shows it."""

    kind: FaultKind
    gpu: int | None
    value: object
    message: str

    @property
    def key(self) -> str:
        return condition_key(self.kind, self.gpu)


def condition_key(kind: FaultKind, gpu: int | None) -> str:
    return f"{kind.value}:{'node' if gpu is None else gpu}"


def telemetry_conditions(t: GpuTelemetry) -> list[Observed]:
    """Every fault condition one GPU's telemetry shows, with a value that can worsen."""
    out: list[Observed] = []
    unsupported = set(t.unsupported)
    g, where = t.index, f"GPU {t.index} ({t.pci_bus_id})"
    if t.ecc_dbe_volatile > 0 and "ecc_dbe_volatile" not in unsupported:
        out.append(Observed(FaultKind.ECC_DBE, g, t.ecc_dbe_volatile,
                            f"{where}: {t.ecc_dbe_volatile} volatile double-bit ECC error(s)"))
    if t.row_remap_pending and "row_remap_pending" not in unsupported:
        out.append(Observed(FaultKind.ROW_REMAP_PENDING, g, True, f"{where}: row remap pending a GPU reset"))
    if t.row_remap_failure and "row_remap_failure" not in unsupported:
        out.append(Observed(FaultKind.ROW_REMAP_FAILURE, g, True, f"{where}: row remap failed"))
    down = [i for i, up in enumerate(t.nvlink_up) if not up]
    if down:
        out.append(Observed(FaultKind.NVLINK_DOWN, g, len(down), f"{where}: NVLink(s) {down} down"))
    # Many GPUs lower their PCIe generation when idle to save power; that is not a fault,
    # so a lower generation counts only while the GPU is not idle. A narrower link always counts.
    idle = "gpu_idle" in t.throttle_reasons
    width_low = 0 < t.pcie_width < t.pcie_width_max and "pcie_width" not in unsupported
    gen_low = 0 < t.pcie_gen < t.pcie_gen_max and not idle and "pcie_gen" not in unsupported
    if width_low or gen_low:
        out.append(Observed(FaultKind.PCIE_DEGRADED, g, f"Gen{t.pcie_gen}x{t.pcie_width}",
                            f"{where}: PCIe link Gen{t.pcie_gen}x{t.pcie_width}, "
                            f"below its maximum Gen{t.pcie_gen_max}x{t.pcie_width_max}"))
    thermal = sorted(THERMAL_REASONS & set(t.throttle_reasons))
    if thermal:
        out.append(Observed(FaultKind.THERMAL_THROTTLE, g, True,
                            f"{where}: thermal clock slowdown ({', '.join(thermal)}) at {t.temperature_c:.0f} C"))
    return out


def worsened(kind: FaultKind, old, new) -> bool:
    """Whether an active condition got worse enough to report again."""
    if kind in (FaultKind.ECC_DBE, FaultKind.NVLINK_DOWN):
        try:
            return float(new) > float(old)
        except (TypeError, ValueError):
            return new != old
    return False


@dataclass
class Condition:
    kind: str
    gpu: int | None
    value: object
    message: str
    action: str
    since: float


class ConditionBook:
    """The active conditions of one node, persisted as JSON in the store's kv table."""

    def __init__(self, node: str, saved: str | None):
        self.key = f"health.conditions:{node}"
        self.active: dict[str, Condition] = {k: Condition(**v) for k, v in json.loads(saved or "{}").items()}

    def to_json(self) -> str:
        return json.dumps({k: asdict(v) for k, v in self.active.items()}, sort_keys=True, default=str)

    def gpu_keys(self, gpu: int) -> list[str]:
        return [k for k, c in self.active.items() if c.gpu == gpu]
