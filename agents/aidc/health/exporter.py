"""The agent's Prometheus metrics, named as in docs/metrics.md (dcgm-exporter's names where
one exists). Each agent has its own registry, so several agents (the lab runs one per
simulated node) can live in one process, as the tests do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aidc import __version__
from aidc.device.base import GpuTelemetry
from aidc.device.nvml import POWER_REASONS, THERMAL_REASONS, encode_clock_event_reasons
from aidc.health.infiniband import COUNTERS as IB_COUNTERS
from aidc.health.infiniband import IbPort
from aidc.probes import Probe, metrics_app, rendered_app, serve_wsgi

# dcgm-exporter's labels on every GPU series (its metrics template, release 4.5.3-4.8.2):
# gpu index, UUID, PCI bus id, device node name (nvidiaN), model name, host name.
GPU_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")


def _nvlinks_down(t: GpuTelemetry) -> int:
    return sum(1 for up in t.nvlink_up if not up)


def _nvlink_total(counter: str):
    return lambda t: sum(n for _link, name, n in t.nvlink_errors if name == counter)


# (metric name, type, help, GpuTelemetry attribute or a function of it, the field that makes it
# absent when in `unsupported`). DCGM_FI_* names and types follow dcgm-exporter's counters file
# (tests/health/data/dcgm-exporter-default-counters.csv pins the copy a test compares with).
GPU_METRICS = (
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "temperature_c", "temperature_c"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", "memory_temp_c", "memory_temp_c"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "power_w", "power_w"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ).",
     "energy_mj", "energy_mj"),
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", "sm_clock_mhz", "sm_clock_mhz"),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", "mem_clock_mhz", "mem_clock_mhz"),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "gpu_util_pct", "gpu_util_pct"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", "mem_copy_util_pct", "mem_copy_util_pct"),
    ("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", "enc_util_pct", "enc_util_pct"),
    ("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", "dec_util_pct", "dec_util_pct"),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", "fb_free_mib", "fb_free_mib"),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", "fb_used_mib", "fb_used_mib"),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).", "fb_reserved_mib",
     "fb_reserved_mib"),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries.", "pcie_replay", "pcie_replay"),
    # The DCGM field's current name (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS is its deprecated alias).
    ("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "gauge", "NVML clock-event reasons bitmask.",
     lambda t: encode_clock_event_reasons(t.throttle_reasons), "throttle_reasons"),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors.",
     "ecc_sbe_volatile", "ecc_sbe_volatile"),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.",
     "ecc_dbe_volatile", "ecc_dbe_volatile"),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "counter", "Total number of single-bit persistent ECC errors.",
     "ecc_sbe_aggregate", "ecc_sbe_aggregate"),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "counter", "Total number of double-bit persistent ECC errors.",
     "ecc_dbe_aggregate", "ecc_dbe_aggregate"),
    ("DCGM_FI_DEV_RETIRED_SBE", "counter", "Total number of retired pages due to single-bit errors.",
     "retired_pages_sbe", "retired_pages_sbe"),
    ("DCGM_FI_DEV_RETIRED_DBE", "counter", "Total number of retired pages due to double-bit errors.",
     "retired_pages_dbe", "retired_pages_dbe"),
    # A counter in dcgm-exporter's file although NVML reports 0/1 (pending or not): kept as it types it.
    ("DCGM_FI_DEV_RETIRED_PENDING", "counter", "Total number of pages pending retirement.",
     "retired_pages_pending", "retired_pages_pending"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors",
     "row_remap_correctable", "row_remap_correctable"),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors",
     "row_remap_uncorrectable", "row_remap_uncorrectable"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed", "row_remap_failure",
     "row_remap_failure"),
    ("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge", "1 when a row remap waits for a GPU reset", "row_remap_pending",
     "row_remap_pending"),
    ("DCGM_FI_DEV_PCIE_LINK_GEN", "gauge", "Current PCIe generation", "pcie_gen", "pcie_gen"),
    ("DCGM_FI_DEV_PCIE_LINK_WIDTH", "gauge", "Current PCIe width", "pcie_width", "pcie_width"),
    ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink flow-control CRC errors.",
     _nvlink_total("crc_flit"), "nvlink_up"),
    ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink data CRC errors.",
     _nvlink_total("crc_data"), "nvlink_up"),
    ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink retries.",
     _nvlink_total("replay"), "nvlink_up"),
    ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink recovery errors.",
     _nvlink_total("recovery"), "nvlink_up"),
    ("aidc_gpu_pcie_link_gen_max", "gauge", "Maximum PCIe generation", "pcie_gen_max", "pcie_gen_max"),
    ("aidc_gpu_pcie_link_width_max", "gauge", "Maximum PCIe width", "pcie_width_max", "pcie_width_max"),
    ("aidc_gpu_nvlink_down", "gauge", "NVLinks down on this GPU", _nvlinks_down, None),
    ("aidc_gpu_thermal_throttled", "gauge", "1 while thermal clock slowdown is active",
     lambda t: int(bool(THERMAL_REASONS & set(t.throttle_reasons))), "throttle_reasons"),
    ("aidc_gpu_power_throttled", "gauge", "1 while power clock slowdown is active",
     lambda t: int(bool(POWER_REASONS & set(t.throttle_reasons))), "throttle_reasons"),
)
# What dcgm-exporter exports with its default counters file, of the series above (and the XID
# gauge): with `agent.dcgm_exporter: present` the agent leaves these to it, so that no series
# is exported twice. A test keeps this equal to the pinned file's uncommented names.
DCGM_EXPORTER_DEFAULTS = frozenset({
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE",
})
# InfiniBand port counters (sysfs counters/<name>) -> metric name (a counter, `_total` added).
IB_COUNTER_METRICS = {name: f"aidc_ib_{name.lower()}" for name in IB_COUNTERS}
IB_LABELS = ("Hostname", "device", "port")
# Counters whose names dcgm-exporter gives without the `_total` suffix: the text format names
# their TYPE line after the series itself (see render()).
_BARE_COUNTERS = tuple(name for name, kind, *_ in GPU_METRICS if kind == "counter" and name.startswith("DCGM_FI_"))


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (0.0.4) of the registry. prometheus_client names a counter's
    HELP/TYPE lines `<name>_total` whatever its series are called; dcgm-exporter's counters
    (DCGM_FI_DEV_ECC_SBE_VOL_TOTAL ...) have no such suffix, so their lines are renamed to the
    series' name, as dcgm-exporter writes them."""
    text = generate_latest(registry).decode()
    for name in _BARE_COUNTERS:
        text = text.replace(f"# HELP {name}_total ", f"# HELP {name} ").replace(
            f"# TYPE {name}_total counter\n", f"# TYPE {name} counter\n")
    return text.encode()


class _GpuCollector:
    """The GPU series from the latest telemetry of each GPU. A collector rather than
    Gauge/Counter objects because counters here are the device's own running totals (set, not
    incremented), and a field the GPU does not support must be absent, not 0."""

    def __init__(self, skip: frozenset[str]):
        self.skip = skip
        self.latest: dict[int, tuple[tuple[str, ...], GpuTelemetry]] = {}

    def collect(self):
        gpus = list(self.latest.values())  # the scrape's thread; the agent's loop adds GPUs meanwhile
        for name, kind, help_, how, field in GPU_METRICS:
            if name in self.skip:
                continue
            family = Metric(name, help_, kind)
            for labels, t in gpus:
                if field is not None and field in t.unsupported:
                    continue
                value = how(t) if callable(how) else getattr(t, how)
                family.add_sample(name, dict(zip(GPU_LABELS, labels)), float(value))
            yield family
        links = CounterMetricFamily("aidc_gpu_nvlink_errors", "NVLink error counters by link and counter "
                                    "(NVML nvmlDeviceGetNvLinkErrorCounter)", labels=GPU_LABELS + ("link", "error"))
        for labels, t in gpus:
            for link, error, count in t.nvlink_errors:
                links.add_metric(labels + (str(link), error), float(count))
        yield links


class _IbCollector:
    """InfiniBand ports from the latest sysfs read: values absent where the file was unreadable."""

    def __init__(self, node: str):
        self.node = node
        self.ports: list[IbPort] = []

    def collect(self):
        up = GaugeMetricFamily("aidc_ib_port_up", "InfiniBand port state (1 = ACTIVE)", labels=IB_LABELS)
        state = GaugeMetricFamily("aidc_ib_port_state", "InfiniBand port state number (kernel ib_port_state; "
                                  "4 = ACTIVE)", labels=IB_LABELS)
        phys = GaugeMetricFamily("aidc_ib_port_phys_state", "InfiniBand port physical state number "
                                 "(5 = LinkUp)", labels=IB_LABELS)
        rate = GaugeMetricFamily("aidc_ib_port_rate_gbps", "InfiniBand port rate (Gb/s)", labels=IB_LABELS)
        counters = {name: CounterMetricFamily(metric, f"InfiniBand port counter {name} (sysfs counters/{name})",
                                              labels=IB_LABELS) for name, metric in IB_COUNTER_METRICS.items()}
        for p in self.ports:
            labels = (self.node, p.device, p.port)
            if p.state is not None:
                up.add_metric(labels, 1.0 if p.up else 0.0)
                state.add_metric(labels, float(p.state))
            if p.phys_state is not None:
                phys.add_metric(labels, float(p.phys_state))
            if p.rate_gbps is not None:
                rate.add_metric(labels, p.rate_gbps)
            for name, value in p.counters.items():
                counters[name].add_metric(labels, float(value))
        yield from (up, state, phys, rate, *counters.values())


if TYPE_CHECKING:
    from aidc.runbook.tls import TLSConfig


class HealthMetrics:
    """`dcgm_exporter_present`: dcgm-exporter runs beside the agent (the spec's
    `agent.dcgm_exporter: present`), so the series it exports by default are left to it."""

    def __init__(self, node: str, backend: str, version: str = __version__, *, dcgm_exporter_present: bool = False):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.skipped = DCGM_EXPORTER_DEFAULTS if dcgm_exporter_present else frozenset()
        self._gpus = _GpuCollector(self.skipped)
        r.register(self._gpus)
        self._ib = _IbCollector(node)
        r.register(self._ib)
        # Kept off the registry when dcgm-exporter owns it, like the series above.
        self.xid_last = Gauge("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.",
                              GPU_LABELS, registry=None if "DCGM_FI_DEV_XID_ERRORS" in self.skipped else r)
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
        self.burnin_passed = Gauge("aidc_burnin_passed", "1 when the node's newest burn-in certificate passed it",
                                   ("Hostname",), registry=r)
        self.burnin_link_fraction = Gauge(
            "aidc_burnin_busbw_link_fraction", "Bus bandwidth of the largest size in the newest burn-in "
            "certificate's collective sweep, as a fraction of the link rate", ("Hostname", "collective"), registry=r)
        self.checkpoint_used = Gauge("aidc_checkpoint_volume_used_ratio", "Checkpoint volume fill level (0-1)",
                                     ("Hostname", "path"), registry=r)
        self.audit_verify_ok = Gauge("aidc_audit_verify_ok", "1 when the last verification of the agent's audit "
                                     "log passed", ("Hostname",), registry=r)
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
        self._labels: dict[int, tuple[str, ...]] = {}
        self._server = None

    def gpu_labels(self, gpu: int, pci: str | None = None) -> tuple[str, ...]:
        """GPU_LABELS' values for a GPU (what is known of it before its first telemetry)."""
        return self._labels.get(gpu, (str(gpu), "", pci or "", f"nvidia{gpu}", "", self.node))

    def update_gpu(self, t: GpuTelemetry) -> None:
        labels = (str(t.index), t.uuid, t.pci_bus_id, f"nvidia{t.index}", t.name, self.node)
        self._labels[t.index] = labels
        self._gpus.latest[t.index] = (labels, t)
        self.gpu_lost.labels(*labels).set(0)

    def update_ib(self, ports: list[IbPort]) -> None:
        self._ib.ports = list(ports)

    def set_lost(self, gpu: int, lost: bool) -> None:
        self.gpu_lost.labels(*self.gpu_labels(gpu)).set(1 if lost else 0)

    def xid(self, gpu: int | None, pci: str | None, xid: int) -> None:
        labels = self.gpu_labels(gpu, pci) if gpu is not None else ("", "", pci or "", "", "", self.node)
        self.xid_last.labels(*labels).set(xid)
        self.xid_total.labels(self.node, labels[0], labels[2], str(xid)).inc()

    def fault(self, kind: str, action: str) -> None:
        self.faults_total.labels(self.node, kind, action).inc()

    def straggler_window(self, compute_s: float, comm_s: float, relative_perf: float) -> None:
        self.train_step_seconds.labels(self.node, "compute").set(compute_s)
        self.train_step_seconds.labels(self.node, "comm").set(comm_s)
        self.relative_perf.labels(self.node, "train_step").set(relative_perf)

    def serve(self, port: int, addr: str = "127.0.0.1", tls: TLSConfig | None = None, probe: Probe | None = None):
        """Serve /metrics (and with `probe`, /healthz and /readyz) on addr:port (loopback by
        default), over HTTPS with `tls` (then plain HTTP is refused in the handshake; with a
        client CA, only its clients' certificates). Returns the server."""
        registry = self.registry
        app = metrics_app(rendered_app(lambda: render(registry), CONTENT_TYPE_LATEST), probe)
        self._server = serve_wsgi(app, addr, port, tls, name=f"metrics-{self.node}")
        return self._server

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

