"""`aidc health check`: one look at a node, for Slurm's HealthCheckProgram.

Read-only and quick: the device layer (every call under a short timeout; a hang is itself
unhealthy), then the recent kernel log. Unhealthy means a finding whose catalog action takes
a node out of service under the spec's `policy.out_of_service_actions`, the same rule the
failover controller applies, so the two never disagree about a node. Deciding is all it does:
draining is the controller's (audited, blast-radius limited) job, never this program's.

Kept off heavy imports (no torch; the spec is parsed only when one is named), because Slurm
runs it on every node every HealthCheckInterval and waits for it.
"""

from __future__ import annotations

import calendar
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from aidc.device.base import DeviceBackend
from aidc.device.timed import TimedBackend
from aidc.errors import DeviceError, DeviceHang
from aidc.events import FaultKind
from aidc.health.catalog import XidCatalog
from aidc.health.conditions import telemetry_conditions
from aidc.health.kmsg import KernelLogFollower, KernelLogParser, Position

TAIL_BYTES = 2 << 20  # of a kernel log file: far more than a check window's worth of lines
LOST_MARKERS = ("fallen off the bus", "is lost", "gpu_is_lost", "gpu is lost")

_DMESG = re.compile(r"^\[\s*(\d+\.\d+)\]")
_KMSG = re.compile(r"^\d+,\d+,(\d+),[^;]*;")
_DMESG_T = re.compile(r"^\[([A-Z][a-z]{2} [A-Z][a-z]{2}\s+\d{1,2} \d\d:\d\d:\d\d \d{4})\]")
_ISO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?\s")
_SYSLOG = re.compile(r"^([A-Z][a-z]{2}\s+\d{1,2} \d\d:\d\d:\d\d)\s+\S+\s+kernel:")


@dataclass
class Finding:
    what: str
    action: str
    out_of_service: bool


@dataclass
class CheckResult:
    node: str
    findings: list[Finding] = field(default_factory=list)
    gpus_visible: int | None = None
    gpus_expected: int | None = None
    kernel_log: str | None = None
    kernel_faults_in_window: int = 0
    device_hung: bool = False  # a call may still be running on its (daemon) thread

    @property
    def healthy(self) -> bool:
        return not any(f.out_of_service for f in self.findings)

    @property
    def reason(self) -> str:
        bad = [f.what for f in self.findings if f.out_of_service]
        if not bad:
            return "healthy"
        return bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")

    def to_dict(self) -> dict:
        return {"node": self.node, "healthy": self.healthy, "reason": self.reason,
                "gpus_visible": self.gpus_visible, "gpus_expected": self.gpus_expected,
                "kernel_log": self.kernel_log, "kernel_faults_in_window": self.kernel_faults_in_window,
                "findings": [f.__dict__ for f in self.findings]}


def line_time(raw: str, boot_time: float, now: float) -> float | None:
    """When a kernel-log line was written (epoch seconds), from whichever prefix it has; None
    when it has none. dmesg's and /dev/kmsg's stamps count from boot; syslog's has no year."""
    if m := _DMESG.match(raw):
        return boot_time + float(m.group(1))
    if m := _KMSG.match(raw):
        return boot_time + int(m.group(1)) / 1e6
    try:
        if m := _DMESG_T.match(raw):
            return time.mktime(time.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y"))
        if m := _ISO.match(raw):
            stamp = time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
            zone = m.group(2)
            if zone is None:
                return time.mktime(stamp)
            offset = 0 if zone == "Z" else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[-2:]) * 60)
            return calendar.timegm(stamp) - offset
        if m := _SYSLOG.match(raw):
            year = time.localtime(now).tm_year
            when = time.mktime(time.strptime(f"{year} {' '.join(m.group(1).split())}", "%Y %b %d %H:%M:%S"))
            return when if when <= now + 86400 else time.mktime(
                time.strptime(f"{year - 1} {' '.join(m.group(1).split())}", "%Y %b %d %H:%M:%S"))
    except ValueError:
        return None
    return None


def system_boot_time() -> float:
    """The kernel's boot time (epoch seconds), for dmesg's seconds-since-boot stamps."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return time.time() - time.monotonic()


def recent_kernel_lines(path: Path) -> list[str]:
    """The end of a kernel log file (or what /dev/kmsg holds), without reading a whole big file."""
    if path.is_char_device():
        follower = KernelLogFollower(path, Position())
        try:
            lines, _ = follower.read()
        finally:
            follower.close()
        return lines
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(0, size - TAIL_BYTES))
        data = fh.read(TAIL_BYTES)
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > TAIL_BYTES else lines  # the first line was cut


def check_device(dev: TimedBackend, catalog: XidCatalog, out_of_service: set[str], result: CheckResult) -> None:
    def add(kind: FaultKind, what: str) -> None:
        action = catalog.classify_fault(kind).action.value
        result.findings.append(Finding(what, action, action in out_of_service))

    try:
        count = dev.gpu_count()
    except DeviceHang as exc:
        return add(FaultKind.DEVICE_HANG, f"device layer hung: {exc}")
    except DeviceError as exc:
        # Nothing answers at all (no driver, no node): the node cannot run GPU work.
        result.findings.append(Finding(f"device layer unavailable: {exc}", "contact_support", True))
        return
    result.gpus_visible = count
    if result.gpus_expected is not None and count < result.gpus_expected:
        result.findings.append(Finding(f"{count} of {result.gpus_expected} GPUs visible", "contact_support", True))
    for index in range(count):
        try:
            telemetry = dev.telemetry(index)
        except DeviceHang as exc:
            return add(FaultKind.DEVICE_HANG, f"device layer hung reading GPU {index}: {exc}")
        except DeviceError as exc:
            if any(m in str(exc).lower() for m in LOST_MARKERS):
                add(FaultKind.FALLEN_OFF_BUS, f"GPU {index} lost: {exc}")
            else:
                result.findings.append(Finding(f"GPU {index} unreadable: {exc}", "contact_support", True))
            continue
        for observed in telemetry_conditions(telemetry):
            add(observed.kind, observed.message)


def check_kernel_log(path: Path, since_s: float, boot_time: float, catalog: XidCatalog,
                     out_of_service: set[str], result: CheckResult, now: float) -> None:
    """Faults in the last `since_s` seconds. A fault line without a readable time counts as
    recent: a check that cannot tell must not call a faulty node healthy."""
    result.kernel_log = str(path)
    parser = KernelLogParser()
    for raw in recent_kernel_lines(path):
        for fault in parser.feed(raw):
            written = line_time(fault.line.split(" / ")[0], boot_time, now)
            if written is not None and now - written > since_s:
                continue
            result.kernel_faults_in_window += 1
            cls = catalog.classify_kernel(fault.kind, fault.xid, fault.message, fault.severity)
            what = f"XID {fault.xid}" if fault.kind == FaultKind.XID else fault.kind.value.replace("_", " ")
            result.findings.append(Finding(f"{what} on {fault.pci or 'unknown PCI'} in the kernel log "
                                           f"({cls.reason}; {cls.action.value})", cls.action.value,
                                           cls.action.value in out_of_service))


def check_node(node: str, backend: DeviceBackend, *, catalog: XidCatalog, out_of_service: set[str],
               kernel_log: Path | None, since_s: float, boot_time: float | None = None,
               expected_gpus: int | None = None, device_timeout_s: float = 1.0) -> CheckResult:
    result = CheckResult(node, gpus_expected=expected_gpus)
    dev = TimedBackend(backend, device_timeout_s)
    try:
        check_device(dev, catalog, out_of_service, result)
    finally:
        result.device_hung = dev.hung_calls > 0
        dev.close()
    if kernel_log is not None:
        check_kernel_log(kernel_log, since_s, system_boot_time() if boot_time is None else boot_time, catalog,
                         out_of_service, result, time.time())
    return result
