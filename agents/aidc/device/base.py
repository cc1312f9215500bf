"""The device interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GpuTelemetry:
    index: int
    uuid: str
    pci_bus_id: str
    name: str
    temperature_c: float
    power_w: float
    sm_clock_mhz: float
    mem_clock_mhz: float
    # Names of the active clock-event ("throttle") reasons, e.g. "hw_thermal_slowdown".
    throttle_reasons: tuple[str, ...] = ()
    ecc_sbe_volatile: int = 0
    ecc_dbe_volatile: int = 0
    ecc_sbe_aggregate: int = 0
    ecc_dbe_aggregate: int = 0
    retired_pages_sbe: int = 0
    retired_pages_dbe: int = 0
    retired_pages_pending: bool = False
    row_remap_correctable: int = 0
    row_remap_uncorrectable: int = 0
    row_remap_pending: bool = False
    row_remap_failure: bool = False
    pcie_gen: int = 0
    pcie_gen_max: int = 0
    pcie_width: int = 0
    pcie_width_max: int = 0
    # One entry per NVLink: True when the link is up. Empty when the GPU has none.
    nvlink_up: tuple[bool, ...] = ()
    # NVLink error counters since the driver loaded: (link, counter name, count), counter names
    # as NVML's nvmlNvLinkErrorCounter_t: replay, recovery, crc_flit, crc_data.
    nvlink_errors: tuple[tuple[int, str, int], ...] = ()
    # dcgm-exporter's default staples (DCGM_FI_DEV_*), where NVML gives them.
    gpu_util_pct: float = 0.0
    mem_copy_util_pct: float = 0.0
    enc_util_pct: float = 0.0
    dec_util_pct: float = 0.0
    fb_used_mib: float = 0.0
    fb_free_mib: float = 0.0
    fb_reserved_mib: float = 0.0
    energy_mj: int = 0  # total energy since the driver loaded, millijoules (a counter)
    pcie_replay: int = 0  # PCIe replays (retries), a counter
    memory_temp_c: float = 0.0
    # Fields a backend could not read on this GPU (not supported), by name, so that
    # "0" is never confused with "unknown".
    unsupported: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class XidEvent:
    gpu: int
    pci_bus_id: str
    xid: int
    timestamp: float


@runtime_checkable
class DeviceBackend(Protocol):
    """What the agent needs from a GPU driver. Backends: `nvml`, `sim`."""

    name: str

    def gpu_count(self) -> int: ...

    def telemetry(self, index: int) -> GpuTelemetry: ...

    def xid_events(self, timeout_ms: int = 0) -> list[XidEvent]:
        """XID events since the last call (NVML's XidCriticalError event set)."""
        ...

    def torch_device(self, index: int) -> str:
        """Where burn-in work for GPU `index` runs: "cuda:N" on NVML, "cpu" on sim."""
        ...

    def compute_slowdown(self) -> float:
        """How many times slower than nominal this device computes (sim faults; 1.0 on real GPUs)."""
        ...

    def result_corruption(self, index: int) -> float | None:
        """Lab fault injection: None where GPU `index` computes correctly (always on real GPUs),
        else the fraction of each GEMM result's elements it gets wrong (0.0: exactly one)."""
        ...

    def sysfs_root(self) -> str:
        """Where this node's sysfs is (InfiniBand ports under class/infiniband): /sys on a real
        node, a tree the backend keeps up to date on sim."""
        ...

    def close(self) -> None: ...


def open_backend(kind: str, **kwargs) -> DeviceBackend:
    """Open a backend by name; an unknown name lists the valid ones."""
    if kind == "sim":
        from aidc.device.sim import SimBackend

        return SimBackend(**kwargs)
    if kind == "nvml":
        from aidc.device.nvml import NvmlBackend

        return NvmlBackend(**kwargs)
    from aidc.errors import DeviceError

    raise DeviceError(f"unknown device backend {kind!r}; valid: nvml, sim")
