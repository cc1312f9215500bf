"""The `nvml` backend: real GPUs through the NVIDIA driver, via nvidia-ml-py (`pynvml`).

Every telemetry field is read with its own NVML call; a call the GPU does not support
(NVML_ERROR_NOT_SUPPORTED, e.g. row remapping on pre-Ampere parts, NVLink on PCIe cards)
leaves the field at its default and names it in `GpuTelemetry.unsupported`, so that a
0 is never mistaken for "unknown". A GPU that answers NVML_ERROR_GPU_IS_LOST has fallen
off the bus: that is a `DeviceError` saying so, which the health stage turns into a
fault. Calls are not timed here; `TimedBackend` wraps every call, because a wedged
driver call is itself a fault.
"""

from __future__ import annotations

import ctypes
import threading
import time

import pynvml

from aidc.device.base import GpuTelemetry, XidEvent
from aidc.errors import DeviceError, NoDriverError

# NVML clock-event ("throttle") reason bits -> names, as nvidia-smi and DCGM name them.
# The bit values are NVML's public ABI (nvml.h `nvmlClocksEventReason*`).
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x0000000000000001, "gpu_idle"),
    (0x0000000000000002, "applications_clocks_setting"),
    (0x0000000000000004, "sw_power_cap"),
    (0x0000000000000008, "hw_slowdown"),
    (0x0000000000000010, "sync_boost"),
    (0x0000000000000020, "sw_thermal_slowdown"),
    (0x0000000000000040, "hw_thermal_slowdown"),
    (0x0000000000000080, "hw_power_brake_slowdown"),
    (0x0000000000000100, "display_clock_setting"),
)
THERMAL_REASONS = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown"})
POWER_REASONS = frozenset({"sw_power_cap", "hw_power_brake_slowdown"})


def decode_clock_event_reasons(mask: int) -> tuple[str, ...]:
    """Names of the active reasons in an NVML clock-event bitmask; unknown bits as `bit_N`."""
    names = [name for bit, name in CLOCK_EVENT_REASONS if mask & bit]
    known = 0
    for bit, _ in CLOCK_EVENT_REASONS:
        known |= bit
    rest = mask & ~known
    names += [f"bit_{i}" for i in range(64) if rest >> i & 1]
    return tuple(names)


def encode_clock_event_reasons(names: tuple[str, ...] | list[str]) -> int:
    """The inverse of `decode_clock_event_reasons` (the exporter publishes DCGM's bitmask)."""
    bits = dict((name, bit) for bit, name in CLOCK_EVENT_REASONS)
    mask = 0
    for name in names:
        if name in bits:
            mask |= bits[name]
        elif name.startswith("bit_") and name[4:].isdigit():
            mask |= 1 << int(name[4:])
    return mask


# NVML's nvmlNvLinkErrorCounter_t values, named as the exporter labels them.
NVLINK_ERROR_COUNTERS: tuple[tuple[str, int], ...] = (
    ("replay", pynvml.NVML_NVLINK_ERROR_DL_REPLAY),
    ("recovery", pynvml.NVML_NVLINK_ERROR_DL_RECOVERY),
    ("crc_flit", pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT),
    ("crc_data", pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA),
)
MIB = 1024 * 1024


def _field_value(value) -> float:
    """The number in an nvmlFieldValue_t, read by its valueType (nvmlValueType_t)."""
    member = {pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal", pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
              pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal", pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
              pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal"}.get(value.valueType, "siVal")
    return getattr(value.value, member)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is(exc: BaseException, code_name: str) -> bool:
    code = getattr(pynvml, code_name, None)
    return isinstance(exc, pynvml.NVMLError) and code is not None and exc.value == code


class NvmlBackend:
    """DeviceBackend over NVML. Raises `NoDriverError` when there is no driver to talk to."""

    name = "nvml"
    XID_RETRY_S = 60.0  # how often a GPU that could not be registered for XID events is retried

    def __init__(self, sysfs_root: str = "/sys") -> None:
        self._sysfs_root = sysfs_root
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            if _is(exc, "NVML_ERROR_LIBRARY_NOT_FOUND") or _is(exc, "NVML_ERROR_DRIVER_NOT_LOADED"):
                raise NoDriverError(f"no NVIDIA driver: {exc} (is the nvidia kernel module loaded and "
                                    f"libnvidia-ml.so.1 on the library path?)") from None
            raise DeviceError(f"NVML initialisation failed: {exc}") from None
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        self._pci: dict[int, str] = {}
        self._event_set = None
        self._xid_registered: set[int] = set()
        self._xid_retry_at: dict[int, float] = {}  # GPU -> monotonic time to retry registering
        self._closed = False

    # helpers ----------------------------------------------------------------
    def _handle(self, index: int):
        if index not in self._handles:
            try:
                self._handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                raise self._device_error(index, "get handle", exc) from None
        return self._handles[index]

    def _device_error(self, index: int, what: str, exc: BaseException) -> DeviceError:
        if _is(exc, "NVML_ERROR_GPU_IS_LOST"):
            pci = self._pci.get(index, "?")
            return DeviceError(f"GPU {index} ({pci}) is lost: fallen off the bus (NVML: {exc})")
        return DeviceError(f"GPU {index}: {what}: {exc}")

    def _read(self, index: int, field: str, fn, *args, unsupported: list[str]):
        """One NVML call for `field`; NOT_SUPPORTED -> None and the field named unsupported."""
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            if _is(exc, "NVML_ERROR_NOT_SUPPORTED") or _is(exc, "NVML_ERROR_FUNCTION_NOT_FOUND"):
                unsupported.append(field)
                return None
            raise self._device_error(index, field, exc) from None

    # DeviceBackend ----------------------------------------------------------
    def gpu_count(self) -> int:
        try:
            return int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise DeviceError(f"NVML device count: {exc}") from None

    def telemetry(self, index: int) -> GpuTelemetry:
        h = self._handle(index)
        u: list[str] = []

        def rd(field, fn, *a):
            return self._read(index, field, fn, h, *a, unsupported=u)

        rd.unsupported = u
        pci_info = rd("pci_bus_id", pynvml.nvmlDeviceGetPciInfo)
        pci = _text(pci_info.busId) if pci_info is not None else ""
        self._pci[index] = pci
        fields: dict = {
            "index": index,
            "uuid": _text(rd("uuid", pynvml.nvmlDeviceGetUUID) or ""),
            "pci_bus_id": pci,
            "name": _text(rd("name", pynvml.nvmlDeviceGetName) or ""),
        }
        temp = rd("temperature_c", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        fields["temperature_c"] = float(temp) if temp is not None else 0.0
        power_mw = rd("power_w", pynvml.nvmlDeviceGetPowerUsage)
        fields["power_w"] = power_mw / 1000.0 if power_mw is not None else 0.0
        sm = rd("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        fields["sm_clock_mhz"] = float(sm) if sm is not None else 0.0
        mem = rd("mem_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        fields["mem_clock_mhz"] = float(mem) if mem is not None else 0.0
        mask = rd("throttle_reasons", self._clock_event_reasons)
        fields["throttle_reasons"] = decode_clock_event_reasons(int(mask)) if mask is not None else ()

        for field, err_type, counter in (
            ("ecc_sbe_volatile", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC),
            ("ecc_dbe_volatile", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
            ("ecc_sbe_aggregate", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC),
            ("ecc_dbe_aggregate", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC),
        ):
            value = rd(field, pynvml.nvmlDeviceGetTotalEccErrors, err_type, counter)
            if value is not None:
                fields[field] = int(value)

        for field, cause in (
            ("retired_pages_sbe", pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
            ("retired_pages_dbe", pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
        ):
            pages = rd(field, pynvml.nvmlDeviceGetRetiredPages, cause)
            if pages is not None:
                fields[field] = len(pages)
        pending = rd("retired_pages_pending", pynvml.nvmlDeviceGetRetiredPagesPendingStatus)
        if pending is not None:
            fields["retired_pages_pending"] = int(pending) == pynvml.NVML_FEATURE_ENABLED

        remap = rd("row_remap", pynvml.nvmlDeviceGetRemappedRows)
        if remap is not None:
            corr, unc, is_pending, failed = remap
            fields.update(row_remap_correctable=int(corr), row_remap_uncorrectable=int(unc),
                          row_remap_pending=bool(is_pending), row_remap_failure=bool(failed))
        else:  # one call reads all four; name each so a consumer can look any of them up
            u.remove("row_remap")
            u += ["row_remap_correctable", "row_remap_uncorrectable", "row_remap_pending", "row_remap_failure"]

        for field, fn in (("pcie_gen", pynvml.nvmlDeviceGetCurrPcieLinkGeneration),
                          ("pcie_gen_max", pynvml.nvmlDeviceGetMaxPcieLinkGeneration),
                          ("pcie_width", pynvml.nvmlDeviceGetCurrPcieLinkWidth),
                          ("pcie_width_max", pynvml.nvmlDeviceGetMaxPcieLinkWidth)):
            value = rd(field, fn)
            if value is not None:
                fields[field] = int(value)

        fields["nvlink_up"] = self._nvlink_states(index, h, u)
        fields["nvlink_errors"] = self._nvlink_errors(index, h, len(fields["nvlink_up"]))
        self._staples(fields, rd)
        fields["unsupported"] = tuple(u)
        return GpuTelemetry(**fields)

    @staticmethod
    def _clock_event_reasons(handle) -> int:
        # Drivers before R535 only have the older name for the same bitmask.
        try:
            return pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
        except pynvml.NVMLError as exc:
            if not _is(exc, "NVML_ERROR_FUNCTION_NOT_FOUND"):
                raise
            return pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)

    def _nvlink_states(self, index: int, handle, unsupported: list[str]) -> tuple[bool, ...]:
        """State of each NVLink. NVML answers NOT_SUPPORTED / INVALID_ARGUMENT past the last
        link the GPU has, so the first such answer ends the list; none at all -> unsupported."""
        states: list[bool] = []
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                states.append(int(pynvml.nvmlDeviceGetNvLinkState(handle, link)) == pynvml.NVML_FEATURE_ENABLED)
            except pynvml.NVMLError as exc:
                if _is(exc, "NVML_ERROR_GPU_IS_LOST"):
                    raise self._device_error(index, "nvlink_up", exc) from None
                break
        if not states:
            unsupported.append("nvlink_up")
        return tuple(states)

    def _nvlink_errors(self, index: int, handle, links: int) -> tuple[tuple[int, str, int], ...]:
        """Every NVLink's error counters. A counter the link does not keep is left out (absent,
        not 0); a lost GPU is the lost-GPU error, as everywhere."""
        out: list[tuple[int, str, int]] = []
        for link in range(links):
            for name, counter in NVLINK_ERROR_COUNTERS:
                try:
                    out.append((link, name, int(pynvml.nvmlDeviceGetNvLinkErrorCounter(handle, link, counter))))
                except pynvml.NVMLError as exc:
                    if _is(exc, "NVML_ERROR_GPU_IS_LOST"):
                        raise self._device_error(index, "nvlink_errors", exc) from None
        return tuple(out)

    @staticmethod
    def _staples(fields: dict, rd) -> None:
        """dcgm-exporter's default fields that NVML answers (DCGM reads the same NVML calls)."""
        util = rd("gpu_util_pct", pynvml.nvmlDeviceGetUtilizationRates)
        if util is not None:
            fields["gpu_util_pct"], fields["mem_copy_util_pct"] = float(util.gpu), float(util.memory)
        else:
            rd.unsupported.append("mem_copy_util_pct")
        for field, fn in (("enc_util_pct", pynvml.nvmlDeviceGetEncoderUtilization),
                          ("dec_util_pct", pynvml.nvmlDeviceGetDecoderUtilization)):
            value = rd(field, fn)
            if value is not None:
                fields[field] = float(value[0])  # (utilisation, sampling period in us)
        mem = rd("fb_used_mib", pynvml.nvmlDeviceGetMemoryInfo, pynvml.nvmlMemory_v2)
        if mem is not None:
            fields.update(fb_used_mib=mem.used / MIB, fb_free_mib=mem.free / MIB, fb_reserved_mib=mem.reserved / MIB)
        else:
            rd.unsupported += ["fb_free_mib", "fb_reserved_mib"]
        energy = rd("energy_mj", pynvml.nvmlDeviceGetTotalEnergyConsumption)
        if energy is not None:
            fields["energy_mj"] = int(energy)
        replay = rd("pcie_replay", pynvml.nvmlDeviceGetPcieReplayCounter)
        if replay is not None:
            fields["pcie_replay"] = int(replay)
        # HBM temperature has no call of its own: NVML's field value NVML_FI_DEV_MEMORY_TEMP.
        values = rd("memory_temp_c", pynvml.nvmlDeviceGetFieldValues, [pynvml.NVML_FI_DEV_MEMORY_TEMP])
        if values is not None:
            value = values[0]
            if value.nvmlReturn == pynvml.NVML_SUCCESS:
                fields["memory_temp_c"] = float(_field_value(value))
            else:
                rd.unsupported.append("memory_temp_c")

    def _ensure_xid_registration(self) -> None:
        """Register every GPU for XidCriticalError events once. GPUs that cannot are skipped:
        their XIDs still reach the kernel log, which the health stage follows too. One GPU
        failing must not stop the others' events, so a lost GPU (or one whose handle cannot be
        had) is skipped as well, and tried again at most every XID_RETRY_S; telemetry still
        reports it lost."""
        if self._event_set is None:
            self._event_set = pynvml.nvmlEventSetCreate()
        now = time.monotonic()
        for index in range(self.gpu_count()):
            if index in self._xid_registered or now < self._xid_retry_at.get(index, 0.0):
                continue
            try:
                h = self._handle(index)
                pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, self._event_set)
            except DeviceError:  # no handle
                self._xid_retry_at[index] = now + self.XID_RETRY_S
                continue
            except pynvml.NVMLError as exc:
                if _is(exc, "NVML_ERROR_GPU_IS_LOST"):
                    self._xid_retry_at[index] = now + self.XID_RETRY_S
                    continue
                if not _is(exc, "NVML_ERROR_NOT_SUPPORTED"):
                    raise self._device_error(index, "register XID events", exc) from None
            self._xid_registered.add(index)
            if index not in self._pci:
                try:
                    self._pci[index] = _text(pynvml.nvmlDeviceGetPciInfo(h).busId)
                except pynvml.NVMLError:
                    self._pci[index] = ""

    def _index_of(self, handle) -> int:
        address = ctypes.cast(handle, ctypes.c_void_p).value
        for index, h in self._handles.items():
            if ctypes.cast(h, ctypes.c_void_p).value == address:
                return index
        try:
            return int(pynvml.nvmlDeviceGetIndex(handle))
        except pynvml.NVMLError:
            return -1

    def xid_events(self, timeout_ms: int = 0) -> list[XidEvent]:
        """Drain the XID event set: wait up to `timeout_ms` for the first event, then take
        whatever else is queued without waiting."""
        with self._lock:
            self._ensure_xid_registration()
            events: list[XidEvent] = []
            wait = timeout_ms
            for _ in range(1024):  # bounded drain
                try:
                    data = pynvml.nvmlEventSetWait_v2(self._event_set, wait)
                except pynvml.NVMLError as exc:
                    if _is(exc, "NVML_ERROR_TIMEOUT"):
                        break
                    raise DeviceError(f"NVML XID event wait: {exc}") from None
                wait = 0
                if not data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                    continue
                index = self._index_of(data.device)
                events.append(XidEvent(index, self._pci.get(index, ""), int(data.eventData), time.time()))
            return events

    def torch_device(self, index: int) -> str:
        return f"cuda:{index}"

    def compute_slowdown(self) -> float:
        return 1.0

    def result_corruption(self, index: int) -> float | None:
        return None  # a real GPU's wrong answers are what the known-answer checks find

    def sysfs_root(self) -> str:
        return self._sysfs_root

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._event_set is not None:
                pynvml.nvmlEventSetFree(self._event_set)
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
