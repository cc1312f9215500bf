"""The lab's simulated GPUs: the same interface as NVML, backed by one JSON file per node.

A node directory holds `device.json` (the GPUs' state) and `kern.log` (the node's
kernel log). Fault injection (`inject`) changes the state under a file lock and writes
the kernel-log lines the real driver writes, so the health stage's kernel-log path is
exercised end to end. Everything here is named simulated; nothing else in aidc
special-cases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from aidc.device.base import GpuTelemetry, XidEvent
from aidc.errors import DeviceError
from aidc.files import SHARED_MODE, shared_opener, touch, write_atomic
from aidc.polling import DirectoryWatch

STATE_FILE = "device.json"
KERNEL_LOG = "kern.log"
LINKS_FILE = "links.json"  # per-rail link state, written by `aidc device inject NODE_DIR link ...`
SYSFS_DIR = "sys"  # the node's simulated sysfs: InfiniBand ports, one HCA per rail
MAX_HANG_S = 600  # an injected hang is bounded, so no test can hang forever

FAULTS = ("xid", "ecc_dbe", "thermal", "nvlink_down", "fallen_off_bus", "slowdown", "hang", "sdc", "clear")

XID_TEXT = {
    13: "pid=2317, name=python, Ch 00000008, Graphics Exception: ESR 0x50df30=0x1000e",
    31: "pid=2317, name=python, Ch 00000008, intr 10000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f_1a2b3000.",
    43: "pid=2317, name=python, Ch 00000008",
    48: "An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 3, subpartition 0.",
    63: "Row Remapper: New row (0x0000000000a3c000) was marked for remapping, reset gpu to activate.",
    64: "Row Remapper: Failed to remap row (0x0000000000a3c000).",
    74: "NVLink: fatal error detected on link 3(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)",
    79: "pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    94: "pid=2317, name=python, Ch 00000008, Contained: SM (0x1). RST: No, D-RST: No",
    95: "pid=2317, name=python, Ch 00000008, Uncontained: FBHUB. RST: Yes, D-RST: No",
    109: "pid=2317, name=python, Ch 00000008, errorString CTX SWITCH TIMEOUT, Info 0x3c00c",
    154: "GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)",
}


def _pci(node_index: int, gpu: int) -> str:
    return f"00000000:{0x17 + 0x10 * gpu + node_index:02X}:00.0"


def create_node(node_dir: str | Path, node: str, gpus: int, node_index: int = 0, *, rails: int = 0,
                link_speed_gbps: float = 400.0) -> Path:
    """Lay out a simulated node: healthy GPUs, one InfiniBand port per rail, an empty kernel log."""
    node_dir = Path(node_dir)
    node_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "node": node,
        "boot_time": time.time(),
        "slowdown": 1.0,
        "hang_s": 0.0,
        "xid_events": [],
        "ib_rails": rails,
        "ib_rate_gbps": link_speed_gbps,
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-SIM-{node}-{i}",
                "pci_bus_id": _pci(node_index, i),
                "name": "Simulated GPU (aidc lab)",
                "temperature_c": 41.0 + i,
                "power_w": 85.0,
                "sm_clock_mhz": 1980.0,
                "mem_clock_mhz": 2619.0,
                "throttle_reasons": [],
                "ecc_sbe_volatile": 0,
                "ecc_dbe_volatile": 0,
                "ecc_sbe_aggregate": 0,
                "ecc_dbe_aggregate": 0,
                "retired_pages_sbe": 0,
                "retired_pages_dbe": 0,
                "retired_pages_pending": False,
                "row_remap_correctable": 0,
                "row_remap_uncorrectable": 0,
                "row_remap_pending": False,
                "row_remap_failure": False,
                "pcie_gen": 5,
                "pcie_gen_max": 5,
                "pcie_width": 16,
                "pcie_width_max": 16,
                "nvlink_up": [],
                "nvlink_errors": [],
                "gpu_util_pct": 0.0,
                "mem_copy_util_pct": 0.0,
                "enc_util_pct": 0.0,
                "dec_util_pct": 0.0,
                "fb_used_mib": 0.0,
                "fb_free_mib": 81559.0,
                "fb_reserved_mib": 521.0,
                "energy_mj": 0,
                "pcie_replay": 0,
                "memory_temp_c": 38.0 + i,
                "fallen_off_bus": False,
            }
            for i in range(gpus)
        ],
    }
    _write(node_dir, state)
    touch(node_dir / KERNEL_LOG)
    return node_dir


@contextlib.contextmanager
def _locked_state(node_dir: Path):
    with open(node_dir / (STATE_FILE + ".lock"), "a", opener=shared_opener) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _read_state(node_dir)
        yield state
        _write(node_dir, state)


def _read_state(node_dir: Path) -> dict:
    path = node_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DeviceError(f"simulated node state {path} is unreadable or corrupt "
                          f"(expected the JSON object written by `aidc lab up`): {exc}") from None
    if not isinstance(state, dict):
        raise DeviceError(f"simulated node state {path} is corrupt (expected a JSON object)")
    return state


def _write(node_dir: Path, state: dict) -> None:
    write_atomic(node_dir / STATE_FILE, json.dumps(state, indent=1), SHARED_MODE)


def boot_time(node_dir: str | Path) -> float:
    """When the simulated node "booted": its kernel log's `[seconds]` stamps count from here."""
    return float(_read_state(Path(node_dir))["boot_time"])


def _kernel_lines(node_dir: Path, state: dict, lines: list[str]) -> None:
    """Append lines as the kernel would log them: dmesg's `[seconds.micros]` prefix."""
    uptime = time.time() - state["boot_time"]
    with open(node_dir / KERNEL_LOG, "a", opener=shared_opener) as log:
        for line in lines:
            log.write(f"[{uptime:12.6f}] {line}\n")
        log.flush()
        os.fsync(log.fileno())


def _short_pci(pci: str) -> str:
    # The driver prints PCI:DDDD:BB:DD without the function, as in the real log.
    domain, bus, devfn = pci.split(":")
    return f"{domain[-4:]}:{bus}:{devfn.split('.')[0]}"


def inject(node_dir: str | Path, fault: str, gpu: int = 0, *, xid: int = 79, factor: float = 4.0,
           seconds: float = 30.0, kernel_line: bool = True, rate: float | None = None) -> dict:
    """Inject a fault into a simulated node. Returns what was done (with the time written).
    `kernel_line=False`: the driver's event only, no kernel-log line (to time the event path).
    `sdc`: that GPU's GEMM results come out wrong without any error, one element of each result
    or, with `rate`, that fraction of its elements (0 < rate <= 1): silent data corruption."""
    if fault == "sdc" and rate is not None and not 0 < rate <= 1:  # NaN fails this too
        raise DeviceError(f"sdc rate must be a fraction of the result's elements in (0, 1], got {rate}")
    node_dir = Path(node_dir)
    if not (node_dir / STATE_FILE).exists():
        raise DeviceError(f"no simulated node at {node_dir} (missing {STATE_FILE}); lab nodes live in <lab-dir>/nodes/<name>")
    if fault not in FAULTS:
        raise DeviceError(f"unknown fault {fault!r}; valid: {', '.join(FAULTS)}")
    with _locked_state(node_dir) as state:
        if not 0 <= gpu < len(state["gpus"]):
            raise DeviceError(f"gpu {gpu} out of range: node has {len(state['gpus'])} GPUs")
        g = state["gpus"][gpu]
        pci = g["pci_bus_id"]
        lines: list[str] = []
        if fault == "xid":
            lines.append(f"NVRM: Xid (PCI:{_short_pci(pci)}): {xid}, {XID_TEXT.get(xid, 'pid=<unknown>, name=<unknown>, Ch 00000000')}")
            state["xid_events"].append({"gpu": gpu, "xid": xid, "ts": time.time()})
            if xid == 79:
                g["fallen_off_bus"] = True
            if xid == 48:
                g["ecc_dbe_volatile"] += 1
                g["ecc_dbe_aggregate"] += 1
        elif fault == "ecc_dbe":
            g["ecc_dbe_volatile"] += 1
            g["ecc_dbe_aggregate"] += 1
            g["retired_pages_dbe"] += 1
            g["row_remap_pending"] = True
            lines.append(f"NVRM: Xid (PCI:{_short_pci(pci)}): 48, {XID_TEXT[48]}")
            state["xid_events"].append({"gpu": gpu, "xid": 48, "ts": time.time()})
        elif fault == "thermal":
            g["temperature_c"] = 93.0
            g["sm_clock_mhz"] = 1100.0
            g["throttle_reasons"] = ["hw_thermal_slowdown", "sw_thermal_slowdown"]
        elif fault == "nvlink_down":
            g["nvlink_up"] = [False] + [True] * 17 if not g["nvlink_up"] else [False] + g["nvlink_up"][1:]
            # A link that drops went through a failed recovery first, as NVML's counter shows.
            errors = {(link, name): n for link, name, n in g.get("nvlink_errors", [])}
            for link in range(len(g["nvlink_up"])):
                for name in ("replay", "recovery", "crc_flit", "crc_data"):
                    errors.setdefault((link, name), 0)
            errors[(0, "recovery")] += 1
            g["nvlink_errors"] = [[link, name, n] for (link, name), n in sorted(errors.items())]
        elif fault == "fallen_off_bus":
            # The multi-line message the driver prints when the GPU vanishes without an XID.
            g["fallen_off_bus"] = True
            lines += [
                f"NVRM: The NVIDIA GPU {pci}",
                "NVRM: (PCI ID: 10de:2330) installed in this system has",
                "NVRM: fallen off the bus and is not responding to commands.",
            ]
        elif fault == "slowdown":
            if factor < 1.0:
                raise DeviceError(f"slowdown factor must be >= 1.0, got {factor}")
            state["slowdown"] = factor
        elif fault == "hang":
            state["hang_s"] = min(max(seconds, 0.0), MAX_HANG_S)
            state["hang_until"] = time.time() + state["hang_s"]
        elif fault == "sdc":
            # No kernel line and no XID: the driver knows nothing of a wrong answer.
            g["sdc_rate"] = 0.0 if rate is None else rate  # 0.0: exactly one element per result
        elif fault == "clear":
            fresh = json.loads(json.dumps(state))
            for gg in fresh["gpus"]:
                gg.pop("sdc_rate", None)
                gg.update(throttle_reasons=[], temperature_c=41.0 + gg["index"], sm_clock_mhz=1980.0,
                          fallen_off_bus=False, ecc_dbe_volatile=0, row_remap_pending=False,
                          nvlink_up=[True] * len(gg["nvlink_up"]))
            fresh.update(slowdown=1.0, hang_s=0.0, hang_until=0.0)
            state.clear()
            state.update(fresh)
        written_at = time.time()
        if lines and kernel_line:
            _kernel_lines(node_dir, state, lines)
    return {"fault": fault, "gpu": gpu, "pci": pci, "lines": lines, "written_at": written_at}


class SimBackend:
    """DeviceBackend over a simulated node directory."""

    name = "sim"

    def __init__(self, node_dir: str | os.PathLike):
        self.node_dir = Path(node_dir)
        if not (self.node_dir / STATE_FILE).exists():
            raise DeviceError(f"no simulated node at {self.node_dir} (missing {STATE_FILE})")
        self._xid_cursor = len(self._state()["xid_events"])
        self._state_watch: DirectoryWatch | None = None

    def _state(self) -> dict:
        return _read_state(self.node_dir)

    def _maybe_hang(self, state: dict) -> None:
        # An injected hang blocks the call like a wedged driver would; TimedBackend turns it
        # into DeviceHang. Bounded by the injection's duration.
        remaining = state.get("hang_until", 0.0) - time.time()
        if remaining > 0:
            time.sleep(min(remaining, MAX_HANG_S))

    def gpu_count(self) -> int:
        state = self._state()
        self._maybe_hang(state)
        return len(state["gpus"])

    def telemetry(self, index: int) -> GpuTelemetry:
        state = self._state()
        self._maybe_hang(state)
        g = state["gpus"][index]
        if g["fallen_off_bus"]:
            # NVML answers NVML_ERROR_GPU_IS_LOST for a GPU that fell off the bus.
            raise DeviceError(f"GPU {index} ({g['pci_bus_id']}) is lost: fallen off the bus")
        fields = {k: v for k, v in g.items() if k in GpuTelemetry.__dataclass_fields__}
        fields["throttle_reasons"] = tuple(fields["throttle_reasons"])
        fields["nvlink_up"] = tuple(fields["nvlink_up"])
        fields["nvlink_errors"] = tuple(tuple(e) for e in fields.get("nvlink_errors", ()))
        # Energy accrues at the simulated power draw since the node "booted", as NVML's counter does.
        fields["energy_mj"] = int(fields.get("energy_mj", 0) + g["power_w"] * (time.time() - state["boot_time"]) * 1000)
        return GpuTelemetry(**fields)

    def xid_events(self, timeout_ms: int = 0) -> list[XidEvent]:
        """New XID events; with `timeout_ms`, wait that long for the first one, as
        nvmlEventSetWait does: blocked on inotify until the node's state file is replaced
        (every injection replaces it), not polling it."""
        if timeout_ms > 0 and self._state_watch is None:
            try:  # before the read below, so that nothing written after it is missed
                self._state_watch = DirectoryWatch(self.node_dir, lambda n: n == STATE_FILE)
            except OSError:
                pass  # no inotify here: answer now, and the caller asks again
        events = self._new_xids()
        if events or timeout_ms <= 0 or self._state_watch is None:
            return events
        deadline = time.monotonic() + timeout_ms / 1000
        while not events and (remaining := deadline - time.monotonic()) > 0:
            if self._state_watch.wait(remaining):
                events = self._new_xids()
        return events

    def _new_xids(self) -> list[XidEvent]:
        state = self._state()
        self._maybe_hang(state)
        new = state["xid_events"][self._xid_cursor:]
        self._xid_cursor += len(new)
        gpus = state["gpus"]
        return [XidEvent(e["gpu"], gpus[e["gpu"]]["pci_bus_id"], e["xid"], e["ts"]) for e in new]

    def torch_device(self, index: int) -> str:
        return "cpu"

    def compute_slowdown(self) -> float:
        return float(self._state().get("slowdown", 1.0))

    def result_corruption(self, index: int) -> float | None:
        """None for a GPU that computes correctly; for one injected with `sdc`, the fraction of
        each GEMM result's elements that come out wrong (0.0: exactly one)."""
        rate = self._state()["gpus"][index].get("sdc_rate")
        return None if rate is None else float(rate)

    def sysfs_root(self) -> str:
        """The node's simulated sysfs, brought up to date with links.json first."""
        state = self._state()
        self._maybe_hang(state)
        sync_ib_sysfs(self.node_dir, state)
        return str(self.node_dir / SYSFS_DIR)

    def close(self) -> None:
        if self._state_watch is not None:
            self._state_watch.close()
            self._state_watch = None


# --- InfiniBand ports -------------------------------------------------------------------------
# One HCA per rail (mlx5_<rail>, port 1), laid out as the kernel's ib_core lays out
# /sys/class/infiniband, so that the agent reads it with the same code as a real node's.
IB_COUNTERS = ("link_downed", "link_error_recovery", "symbol_error", "port_rcv_errors", "port_xmit_discards",
               "port_rcv_remote_physical_errors", "local_link_integrity_errors", "excessive_buffer_overrun_errors")


def ib_port_dir(node_dir: str | Path, rail: int) -> Path:
    return Path(node_dir) / SYSFS_DIR / "class" / "infiniband" / f"mlx5_{rail}" / "ports" / "1"


def read_links(node_dir: str | Path) -> dict[int, dict]:
    """links.json's rails as {rail: {"up", "rate_fraction", "loss_pct"}}; {} without the file.
    A file that is not that JSON is a DeviceError naming it."""
    path = Path(node_dir) / LINKS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{path}: not the links JSON ({exc})") from None
    rails = data.get("rails") if isinstance(data, dict) else None
    if not isinstance(rails, dict):
        raise DeviceError(f'{path}: expected {{"rails": {{"<rail>": {{"up": ..., "rate_fraction": ..., "loss_pct": ...}}}}}}')
    out = {}
    for key, link in rails.items():
        if not str(key).isdigit() or not isinstance(link, dict):
            raise DeviceError(f"{path}: rail {key!r} is not a rail number mapped to its link state")
        out[int(key)] = {"up": link.get("up", True) is not False,
                         "rate_fraction": float(link.get("rate_fraction", 1.0)),
                         "loss_pct": float(link.get("loss_pct", 0.0))}
    return out


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text, SHARED_MODE)  # a reader sees the old or the new value, never half a file


def sync_ib_sysfs(node_dir: str | Path, state: dict | None = None) -> None:
    """Bring the simulated IB ports in line with links.json: a rail marked down is DOWN /
    Disabled and counts one more link_downed and link_error_recovery on each transition from
    up; a rail with loss counts port_rcv_errors and symbol_error (ceil(loss_pct) per sync);
    the rate is the node's link rate times rate_fraction. Rails not in links.json are up."""
    node_dir = Path(node_dir)
    state = state if state is not None else _read_state(node_dir)
    links = read_links(node_dir)
    rails = sorted(set(range(int(state.get("ib_rails", 0)))) | set(links))
    if not rails:
        return
    (node_dir / SYSFS_DIR).mkdir(exist_ok=True)
    with open(node_dir / SYSFS_DIR / ".lock", "a", opener=shared_opener) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for rail in rails:
            link = links.get(rail, {"up": True, "rate_fraction": 1.0, "loss_pct": 0.0})
            port = ib_port_dir(node_dir, rail)
            counters = port / "counters"
            if not counters.is_dir():
                counters.mkdir(parents=True)
                _write_text(port / "link_layer", "InfiniBand\n")
                for name in IB_COUNTERS:
                    _write_text(counters / name, "0\n")
                _write_text(port / "state", "4: ACTIVE\n")
            was_up = (port / "state").read_text().strip().endswith("ACTIVE")

            def bump(name: str, by: int) -> None:
                try:
                    count = int((counters / name).read_text())
                except (OSError, ValueError):
                    return  # a counter file someone removed or garbled stays as it is (tests do that)
                _write_text(counters / name, f"{count + by}\n")

            if was_up and not link["up"]:
                bump("link_downed", 1)
                bump("link_error_recovery", 1)
            if link["up"] and link["loss_pct"] > 0:
                errors = int(-(-link["loss_pct"] // 1))
                bump("port_rcv_errors", errors)
                bump("symbol_error", errors)
            _write_text(port / "state", "4: ACTIVE\n" if link["up"] else "1: DOWN\n")
            _write_text(port / "phys_state", "5: LinkUp\n" if link["up"] else "3: Disabled\n")
            rate = float(state.get("ib_rate_gbps", 400.0)) * max(link["rate_fraction"], 0.0)
            _write_text(port / "rate", f"{rate:g} Gb/sec (4X)\n")


def telemetry_dict(t: GpuTelemetry) -> dict:
    return asdict(t)
