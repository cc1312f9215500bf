"""The agent's Prometheus metrics, named as in docs/metrics.md (dcgm-exporter's names where
one exists). Each agent has its own registry, so several agents (the lab runs one per
simulated node) can live in one process, as the tests do.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from aidc import __version__
from aidc.device.base import GpuTelemetry
from aidc.device.nvml import POWER_REASONS, THERMAL_REASONS, encode_clock_event_reasons

GPU_LABELS = ("gpu", "UUID", "pci_bus_id", "Hostname")

# (metric name, help, GpuTelemetry attribute or a function of it)
_GPU_GAUGES = (
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (C)", "temperature_c"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (W)", "power_w"),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock (MHz)", "sm_clock_mhz"),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock (MHz)", "mem_clock_mhz"),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "NVML clock-event reasons bitmask",
     lambda t: encode_clock_event_reasons(t.throttle_reasons)),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Volatile single-bit ECC errors", "ecc_sbe_volatile"),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Volatile double-bit ECC errors", "ecc_dbe_volatile"),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Aggregate single-bit ECC errors", "ecc_sbe_aggregate"),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Aggregate double-bit ECC errors", "ecc_dbe_aggregate"),
    ("DCGM_FI_DEV_RETIRED_SBE", "Pages retired for single-bit errors", "retired_pages_sbe"),
    ("DCGM_FI_DEV_RETIRED_DBE", "Pages retired for double-bit errors", "retired_pages_dbe"),
    ("DCGM_FI_DEV_RETIRED_PENDING", "1 when a page retirement waits for a reset", "retired_pages_pending"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Rows remapped for correctable errors", "row_remap_correctable"),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Rows remapped for uncorrectable errors", "row_remap_uncorrectable"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "1 when a row remap failed", "row_remap_failure"),
    ("DCGM_FI_DEV_ROW_REMAP_PENDING", "1 when a row remap waits for a GPU reset", "row_remap_pending"),
    ("DCGM_FI_DEV_PCIE_LINK_GEN", "Current PCIe generation", "pcie_gen"),
    ("DCGM_FI_DEV_PCIE_LINK_WIDTH", "Current PCIe width", "pcie_width"),
    ("aidc_gpu_pcie_link_gen_max", "Maximum PCIe generation", "pcie_gen_max"),
    ("aidc_gpu_pcie_link_width_max", "Maximum PCIe width", "pcie_width_max"),
    ("aidc_gpu_nvlink_down", "NVLinks down on this GPU", lambda t: sum(1 for up in t.nvlink_up if not up)),
    ("aidc_gpu_thermal_throttled", "1 while thermal clock slowdown is active",
     lambda t: int(bool(THERMAL_REASONS & set(t.throttle_reasons)))),
    ("aidc_gpu_power_throttled", "1 while power clock slowdown is active",
     lambda t: int(bool(POWER_REASONS & set(t.throttle_reasons)))),
)


if TYPE_CHECKING:
    from aidc.runbook.tls import TLSConfig


class HealthMetrics:
    def __init__(self, node: str, backend: str, version: str = __version__):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._gauges = [(Gauge(name, help_, GPU_LABELS, registry=r), how) for name, help_, how in _GPU_GAUGES]
        self.xid_last = Gauge("DCGM_FI_DEV_XID_ERRORS", "Last XID seen (dcgm-exporter compatibility; never resets)",
                              GPU_LABELS, registry=r)
        self.gpu_lost = Gauge("aidc_gpu_lost", "1 when the GPU has fallen off the bus (no answer)", GPU_LABELS,
                              registry=r)
        self.xid_total = Counter("aidc_xid_errors", "XIDs seen, by code", ("Hostname", "gpu", "pci_bus_id", "xid"),
                                 registry=r)
        self.faults_total = Counter("aidc_faults", "Fault events emitted", ("Hostname", "kind", "action"), registry=r)
        self.hung_total = Counter("aidc_device_call_hung", "Device calls that timed out", ("Hostname",), registry=r)
        self.kernel_log_unparsed = Counter(
            "aidc_kernel_log_unparsed_lines", "Kernel-log lines that start like the GPU driver's but could not be read "
            "(skipped)", ("Hostname",), registry=r)
        self.monitor_hung = Gauge("aidc_monitor_hung", "1 while the last device poll timed out", ("Hostname",),
                                  registry=r)
        self.quarantined = Gauge("aidc_node_quarantined", "1 while failover holds the node out of service",
                                 ("Hostname",), registry=r)
        # Training stragglers (aidc.health.stragglers): window medians of this node's step phases,
        # and its compute speed relative to the fleet median (test="train_step").
        self.train_step_seconds = Gauge("aidc_train_step_seconds", "This node's training step time by phase "
                                        "(compute, comm: waiting in the gradient all_reduce), median over the "
                                        "straggler window", ("Hostname", "phase"), registry=r)
        self.relative_perf = Gauge("aidc_burnin_relative_perf", "Node result / fleet median (1.0: with the fleet)",
                                   ("Hostname", "test"), registry=r)
        info = Gauge("aidc_agent_info", "Always 1; agent identity", ("Hostname", "version", "backend"), registry=r)
        info.labels(node, version, backend).set(1)
        self.monitor_hung.labels(node).set(0)
        self.hung_total.labels(node)
        self.kernel_log_unparsed.labels(node)
        self._labels: dict[int, tuple[str, str, str, str]] = {}
        self._server = None

    def gpu_labels(self, gpu: int, pci: str | None = None) -> tuple[str, str, str, str]:
        return self._labels.get(gpu, (str(gpu), "", pci or "", self.node))

    def update_gpu(self, t: GpuTelemetry) -> None:
        labels = (str(t.index), t.uuid, t.pci_bus_id, self.node)
        self._labels[t.index] = labels
        for gauge, how in self._gauges:
            value = how(t) if callable(how) else getattr(t, how)
            gauge.labels(*labels).set(float(value))
        self.gpu_lost.labels(*labels).set(0)

    def set_lost(self, gpu: int, lost: bool) -> None:
        self.gpu_lost.labels(*self.gpu_labels(gpu)).set(1 if lost else 0)

    def xid(self, gpu: int | None, pci: str | None, xid: int) -> None:
        labels = self.gpu_labels(gpu, pci) if gpu is not None else ("", "", pci or "", self.node)
        self.xid_last.labels(*labels).set(xid)
        self.xid_total.labels(self.node, labels[0], labels[2], str(xid)).inc()

    def fault(self, kind: str, action: str) -> None:
        self.faults_total.labels(self.node, kind, action).inc()

    def straggler_window(self, compute_s: float, comm_s: float, relative_perf: float) -> None:
        self.train_step_seconds.labels(self.node, "compute").set(compute_s)
        self.train_step_seconds.labels(self.node, "comm").set(comm_s)
        self.relative_perf.labels(self.node, "train_step").set(relative_perf)

    def serve(self, port: int, addr: str = "127.0.0.1", tls: TLSConfig | None = None):
        """Serve /metrics on addr:port (loopback by default), over HTTPS with `tls` (then plain
        HTTP is refused in the handshake; with a client CA, only its clients' certificates).
        Returns the server."""
        extra = {}
        if tls is not None:
            extra = {"certfile": str(tls.cert_file), "keyfile": str(tls.key_file),
                     "tls_min_version": ssl.TLSVersion.TLSv1_2}
            if tls.client_ca_file is not None:
                extra.update(client_cafile=str(tls.client_ca_file), client_auth_required=True)
        server, _thread = start_http_server(port, addr=addr, registry=self.registry, **extra)
        self._server = server
        return server

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
