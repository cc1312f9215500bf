"""InfiniBand port health from sysfs (`<root>/class/infiniband/<hca>/ports/<n>/`).

The kernel's ib_core writes one directory per HCA port: `state` ("4: ACTIVE"), `phys_state`
("5: LinkUp"), `rate` ("400 Gb/sec (4X NDR)") and `counters/` (link_downed, symbol_error,
port_rcv_errors, ...; plain decimal integers that only grow until the HCA resets). The root is
injectable: tests and the lab's simulated nodes point it at a tree of their own.

A file that is missing or does not hold what the kernel writes leaves that one value out
(the metric is absent, never a made-up 0); the reason is logged once per file and problem,
and the rest of the port is still read. Nothing here raises for bad sysfs content.

Fault thresholds (how many link-down transitions in what window is flapping) are data:
`data/fabric_health.yaml`.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from aidc.errors import SpecError

log = logging.getLogger("aidc.health")

THRESHOLDS_FILE = "data/fabric_health.yaml"
ACTIVE = 4  # IB_PORT_ACTIVE in the kernel's enum ib_port_state
# The port counters exported, as the kernel names them under counters/ (all monotonic).
COUNTERS = ("link_downed", "link_error_recovery", "symbol_error", "port_rcv_errors", "port_xmit_discards",
            "port_rcv_remote_physical_errors", "port_rcv_switch_relay_errors", "local_link_integrity_errors",
            "excessive_buffer_overrun_errors", "port_xmit_constraint_errors", "port_rcv_constraint_errors",
            "VL15_dropped")
MAX_PORT_DIRS = 256  # bounded: a tree with more HCA ports than any server has is read this far
_STATE_RE = re.compile(r"^([0-9]{1,2}): ?([A-Za-z_]+)$")
_RATE_RE = re.compile(r"^([0-9]{1,5}(?:\.[0-9]{1,3})?) Gb/sec")
_COUNTER_RE = re.compile(r"^[0-9]{1,20}$")


@dataclass(frozen=True)
class IbPort:
    device: str  # the HCA, e.g. mlx5_0
    port: str  # 1-based port number, as the directory names it
    state: int | None = None  # kernel ib_port_state (4 = ACTIVE); None when unreadable
    state_name: str | None = None
    phys_state: int | None = None  # 5 = LinkUp
    phys_state_name: str | None = None
    rate_gbps: float | None = None
    counters: dict[str, int] = field(default_factory=dict)  # only the readable ones

    @property
    def up(self) -> bool | None:
        return None if self.state is None else self.state == ACTIVE

    @property
    def name(self) -> str:
        return f"{self.device}/{self.port}"


@dataclass(frozen=True)
class FabricThresholds:
    version: str
    flap_downs: int  # this many link_downed increments ...
    flap_window_s: float  # ... within this window is flapping

    @classmethod
    def parse(cls, data, origin: str) -> "FabricThresholds":
        try:
            flap = data["flapping"]
            out = cls(str(data["version"]), int(flap["link_downs"]), float(flap["window_s"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise SpecError(origin, "flapping", f"version and flapping: {{link_downs: N, window_s: S}} ({exc!r})") from None
        if out.flap_downs < 1 or out.flap_window_s <= 0:
            raise SpecError(origin, "flapping", "link_downs >= 1 and window_s > 0")
        return out


@lru_cache(maxsize=1)
def load_thresholds() -> FabricThresholds:
    text = resources.files("aidc").joinpath(THRESHOLDS_FILE).read_text()
    return FabricThresholds.parse(yaml.safe_load(text), f"aidc/{THRESHOLDS_FILE}")


class IbSysfsReader:
    """Reads every port under `<root>/class/infiniband`; logs each unreadable file once."""

    def __init__(self, logger: logging.Logger = log, node: str = ""):
        self.log, self.node = logger, node
        self._logged: set[tuple[str, str]] = set()

    def problem(self, path: Path | str, why: str) -> None:
        key = (str(path), why)
        if key not in self._logged:
            self._logged.add(key)
            self.log.warning("%s: InfiniBand sysfs %s %s; its metric is left out", self.node, path, why)

    def _read(self, path: Path) -> str | None:
        try:
            with open(path, "rb") as handle:
                raw = handle.read(256)  # every value the kernel writes here is a short line
        except FileNotFoundError:
            self.problem(path, "is missing")
            return None
        except OSError as exc:
            self.problem(path, f"cannot be read ({exc.strerror or exc})")
            return None
        try:
            return raw.decode("ascii").strip()
        except UnicodeDecodeError:
            self.problem(path, "is not text")
            return None

    def _state(self, path: Path) -> tuple[int | None, str | None]:
        text = self._read(path)
        if text is None:
            return None, None
        m = _STATE_RE.match(text)
        if not m:
            self.problem(path, f"holds {text[:40]!r}, not '<number>: <NAME>'")
            return None, None
        return int(m.group(1)), m.group(2)

    def read_port(self, device: str, port_dir: Path) -> IbPort:
        state, state_name = self._state(port_dir / "state")
        phys, phys_name = self._state(port_dir / "phys_state")
        rate = None
        text = self._read(port_dir / "rate")
        if text is not None:
            m = _RATE_RE.match(text)
            if m:
                rate = float(m.group(1))
            else:
                self.problem(port_dir / "rate", f"holds {text[:40]!r}, not '<number> Gb/sec ...'")
        counters = {}
        for name in COUNTERS:
            path = port_dir / "counters" / name
            if not path.exists():
                continue  # not every HCA keeps every counter: absent, and not worth a log line
            text = self._read(path)
            if text is None:
                continue
            if _COUNTER_RE.match(text):
                counters[name] = int(text)
            else:
                self.problem(path, f"holds {text[:40]!r}, not a decimal count")
        return IbPort(device, port_dir.name, state, state_name, phys, phys_name, rate, counters)

    def read(self, root: str | os.PathLike) -> list[IbPort]:
        base = Path(root) / "class" / "infiniband"
        try:
            devices = sorted(os.listdir(base))
        except FileNotFoundError:
            return []  # no RDMA devices (or no ib_core): nothing to watch, nothing to log
        except OSError as exc:
            self.problem(base, f"cannot be listed ({exc.strerror or exc})")
            return []
        ports: list[IbPort] = []
        for device in devices:
            try:
                names = sorted(os.listdir(base / device / "ports"), key=lambda p: (len(p), p))
            except OSError as exc:
                self.problem(base / device / "ports", f"cannot be listed ({exc.strerror or exc})")
                continue
            for name in names:
                if len(ports) >= MAX_PORT_DIRS:
                    return ports
                if name.isdigit():
                    ports.append(self.read_port(device, base / device / "ports" / name))
        return ports


class FlapDetector:
    """link_downed increments per port over a sliding window (counter resets count as 0)."""

    def __init__(self, thresholds: FabricThresholds):
        self.t = thresholds
        self._last: dict[str, int] = {}
        self._downs: dict[str, deque[tuple[float, int]]] = {}
        self._since: dict[str, float] = {}  # first reading of each port

    def observe(self, port: str, link_downed: int, now: float) -> int:
        """Record a reading; return the link-down transitions seen in the window."""
        last = self._last.get(port)
        self._last[port] = link_downed
        self._since.setdefault(port, now)
        window = self._downs.setdefault(port, deque(maxlen=1024))
        if last is not None and link_downed > last:
            window.append((now, link_downed - last))
        while window and now - window[0][0] > self.t.flap_window_s:
            window.popleft()
        return sum(n for _, n in window)

    def flapping(self, downs_in_window: int) -> bool:
        return downs_in_window >= self.t.flap_downs

    def watched_a_whole_window(self, port: str, now: float) -> bool:
        """Whether a count under the threshold means "not flapping" rather than "just started
        counting" (after an agent restart, a flapping condition must not clear at once)."""
        return port in self._since and now - self._since[port] >= self.t.flap_window_s
