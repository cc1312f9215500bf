"""The node agent's watch loop.

Faults are seen when they happen, not at the next poll; telemetry is polled. A device
thread reads telemetry every `poll_interval_s` (1 s) through `TimedBackend` (a call past
its timeout is a `device_hang` fault, and the thread carries on), and between two reads
blocks in the driver's XID event wait (NVML `nvmlEventSetWait`; the sim backend waits on
inotify), so an XID event is handed over as it arrives. The main loop blocks in poll()
on the kernel log (/dev/kmsg, or inotify on a log file) and on a pipe the device thread
writes when it hands something over; it wakes for either, or after `poll_interval_s` at
the latest (and at least once a second, to notice a stop). Two loops, so that a sick GPU
cannot blind the kernel-log path. Only the main loop writes: fault events go to the
durable store together with the kernel-log position and the active conditions, in one
transaction, then to the audit log and the metrics. Where no watch is possible (no
inotify) the main loop reads the log every interval.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aidc.audit.log import AuditLog, default_actor
from aidc.device.base import DeviceBackend, GpuTelemetry, XidEvent
from aidc.device.timed import TimedBackend
from aidc.errors import AidcError, DeviceError, DeviceHang
from aidc.events import Action, FaultEvent, FaultKind
from aidc.health.catalog import Classification, XidCatalog, load_catalog
from aidc.health.conditions import Condition, ConditionBook, Observed, condition_key, telemetry_conditions, worsened
from aidc.health.exporter import HealthMetrics
from aidc.health.infiniband import FlapDetector, IbPort, IbSysfsReader, load_thresholds
from aidc.health.kmsg import KernelFault, KernelLogFollower, KernelLogParser, Position, normalize_pci
from aidc.health.stragglers import StragglerWatch
from aidc.probes import DEFAULT_STALL_AFTER_S, Probe
from aidc.store import Store

log = logging.getLogger("aidc.health")

XID_DEDUPE_WINDOW_S = 5.0  # the same XID from NVML and the kernel log within this window is one fault
UNPARSED_LOG_LIMIT = 10  # unreadable kernel-log lines logged per agent run; all are counted in the metric
LOST_MARKERS = ("fallen off the bus", "is lost", "gpu_is_lost", "gpu is lost")
NODE_CHECK_INTERVAL_S = 10.0  # burn-in certificate and checkpoint volume: slow-moving, read this often
AUDIT_VERIFY_INTERVAL_S = 60.0  # a full walk of the hash chain
# The longest either loop blocks at once, whatever the poll interval: how soon a stop is noticed.
MAX_BLOCK_S = 1.0


@dataclass
class Observation:
    """One device poll, as the poller saw it."""

    telemetry: dict[int, GpuTelemetry] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    xids: list[XidEvent] = field(default_factory=list)
    hang: str | None = None
    ib_ports: list[IbPort] | None = None  # None: not read this time (no sysfs, or the device hung)


def poll_device(dev: TimedBackend, ib_reader: IbSysfsReader | None = None) -> Observation:
    obs = Observation()
    try:
        count = dev.gpu_count()
        for index in range(count):
            try:
                obs.telemetry[index] = dev.telemetry(index)
            except DeviceHang:
                raise
            except DeviceError as exc:
                if any(m in str(exc).lower() for m in LOST_MARKERS):
                    obs.lost[index] = str(exc)
                else:
                    obs.errors.append(str(exc))
        obs.xids = dev.xid_events(0)
    except DeviceHang as exc:
        obs.hang = str(exc)
        return obs
    except DeviceError as exc:
        obs.errors.append(str(exc))
    if ib_reader is not None and hasattr(dev.inner, "sysfs_root"):
        try:
            obs.ib_ports = ib_reader.read(dev.sysfs_root())
        except DeviceHang as exc:
            obs.hang = str(exc)
        except Exception as exc:  # noqa: BLE001 -- whatever sysfs holds, the poller and the GPUs go on
            ib_reader.problem("sysfs root", str(exc))
    return obs


class HealthAgent:
    def __init__(self, node: str, backend: DeviceBackend, kernel_log: str | Path | None, store: Store,
                 audit: AuditLog, *, poll_interval_s: float = 1.0, device_timeout_s: float = 2.0,
                 catalog: XidCatalog | None = None, metrics: HealthMetrics | None = None,
                 checkpoint_paths: tuple[str, ...] = (), dcgm_exporter_present: bool = False,
                 step_times: str | Path | None = None, straggler_policy=None):
        self.node = node
        self.dev = backend if isinstance(backend, TimedBackend) else TimedBackend(backend, device_timeout_s)
        self.store, self.audit = store, audit
        self.poll_interval_s = poll_interval_s
        self.catalog = catalog or load_catalog()
        self.metrics = metrics or HealthMetrics(node, self.dev.name, dcgm_exporter_present=dcgm_exporter_present)
        self.ib_reader = IbSysfsReader(log, node)
        self.fabric = load_thresholds()
        self.flaps = FlapDetector(self.fabric)
        # Ports seen ACTIVE: only such a port going down is a fault (a node may have HCA ports it
        # never cabled). Persisted, so a port that went down while the agent was away still counts.
        self.ib_seen_up_key = f"health.ib_seen_up:{node}"
        self.ib_seen_up: set[str] = set(json.loads(store.get(self.ib_seen_up_key) or "[]"))
        self.checkpoint_paths = tuple(checkpoint_paths)
        self._next_node_check = 0.0
        self._next_audit_verify = 0.0
        self._node_check_logged: set[str] = set()
        self.actor = default_actor("health")
        self.conditions = ConditionBook(node, store.get(f"health.conditions:{node}"))
        self.kernel_log = str(kernel_log) if kernel_log else None
        self.position_key = KernelLogFollower.position_key(node, kernel_log) if kernel_log else None
        position = Position.from_json(store.get(self.position_key)) if kernel_log else Position()
        self.parser = KernelLogParser(position.parser, on_unparsed=self._unparsed)
        self._unparsed_logged = 0
        self.follower = KernelLogFollower(kernel_log, position) if kernel_log else None
        self._saved_position = position.to_json()
        self.observations: queue.Queue[Observation] = queue.Queue(maxsize=64)
        # The device thread writes a byte here after each observation, to wake the main loop's poll().
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._log_fd: int | None = None  # the kernel log's watch, from follower.watch()
        self._log_watch_tried = False
        self.pci_to_gpu: dict[str, int] = {}
        self._recent_xids: list[tuple[tuple[int, str | None], str, float]] = []
        # NVML events of follow_stated XIDs waiting for their kernel line: (key, event, cls, seen at).
        self._held: list[tuple[tuple[int, str | None], FaultEvent, Classification, float]] = []
        self.clock = time.monotonic  # for the dedupe window; tests replace it
        self._hung_seen = 0
        self.emitted = 0
        # Training stragglers: the trainer's step-time file for this node (aidc.health.stragglers).
        self.stragglers: StragglerWatch | None = None
        self._certificate_tests: set[str] = set()  # aidc_burnin_relative_perf tests from the certificate
        if step_times:
            from aidc.spec import StragglerPolicy

            self.step_times_key = f"health.step_times:{node}:{step_times}"
            self.stragglers = StragglerWatch(node, step_times, straggler_policy or StragglerPolicy(),
                                             int(store.get(self.step_times_key) or 0))
            self.stragglers.judge.straggling = condition_key(FaultKind.STRAGGLER, None) in self.conditions.active
        for c in self.conditions.active.values():  # a lost GPU stays lost across restarts
            if c.kind == FaultKind.FALLEN_OFF_BUS.value and c.gpu is not None:
                self.metrics.set_lost(c.gpu, True)

    # device thread -------------------------------------------------------------
    def poller(self, halt: threading.Event) -> None:
        """Telemetry every poll interval; in between, block in the driver's XID event wait
        and hand over each event as it comes."""
        while not halt.is_set():
            next_poll = time.monotonic() + self.poll_interval_s
            self._hand_over(poll_device(self.dev, self.ib_reader), halt)
            while not halt.is_set() and (remaining := next_poll - time.monotonic()) > 0:
                try:
                    xids = self.dev.xid_events(max(1, int(min(remaining, MAX_BLOCK_S) * 1000)))
                except (DeviceHang, DeviceError):
                    # The next telemetry read reports it (as a hang or a poll error); until then
                    # do not call into the device again.
                    halt.wait(max(0.0, next_poll - time.monotonic()))
                    break
                if xids:
                    self._hand_over(Observation(xids=xids), halt)

    def _hand_over(self, obs: Observation, halt: threading.Event) -> None:
        while not halt.is_set():  # bounded queue: a slow main loop slows the poller, not memory
            try:
                self.observations.put(obs, timeout=self.poll_interval_s)
                break
            except queue.Full:
                continue
        try:
            os.write(self._wake_w, b"o")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the main loop is awake

    # main loop ------------------------------------------------------------------
    def step(self, wait_s: float = 0.0, *, final: bool = False) -> int:
        """Handle what the device thread saw and follow the kernel log; then, with `wait_s`,
        block until the kernel log changes or the device thread hands something over (at most
        `wait_s`) and handle that. `final`: the agent is stopping, so held NVML events are
        reported now, not lost."""
        before = self.emitted
        if self.follower is not None and not self._log_watch_tried:
            self._log_fd = self.follower.watch()  # before the read: what comes after it wakes us
            self._log_watch_tried = self._log_fd is not None or os.path.isdir(os.path.dirname(self.kernel_log) or ".")
        self._handle_observations()
        self.follow_kernel_log()
        self.follow_step_times()
        if wait_s > 0 and not (self.follower is not None and self.follower.more_to_read):
            waiting = select.poll()  # poll, not select: no limit on descriptor numbers
            for fd in [self._wake_r] + ([self._log_fd] if self._log_fd is not None else []):
                waiting.register(fd, select.POLLIN)
            readable = {fd for fd, _events in waiting.poll(wait_s * 1000)}
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                self._handle_observations()
            if self._log_fd is not None and self._log_fd in readable and self.follower.woken():
                self.follow_kernel_log()
            elif self._log_fd is None:
                self.follow_kernel_log()  # no watch (yet): read every interval
        self._release_held(everything=final)
        self.metrics.quarantined.labels(self.node).set(
            1 if self.store.node_state(self.node) in ("quarantining", "quarantined") else 0)
        self.node_checks()
        return self.emitted - before

    def _handle_observations(self) -> None:
        while True:  # what the poller already saw first: it maps PCI addresses to GPUs
            try:
                self.handle_observation(self.observations.get_nowait())
            except queue.Empty:
                break

    def follow_kernel_log(self) -> None:
        if self.follower is None:
            return
        lines, position = self.follower.read()
        if not lines and position.to_json() == self._saved_position:
            return
        pending: list[tuple[FaultEvent, Classification]] = []
        for line in lines:
            try:
                for fault in self.parser.feed(line):
                    item = self._from_kernel(fault)
                    if item:
                        pending.append(item)
            except Exception as exc:  # one line's fault, not the follower's: the lines after it are read
                self._unparsed(line, f"cannot handle its fault: {exc!r}")
        # Saved past every line read, unreadable ones included, so a restart does not meet them again.
        position.parser = self.parser.state()
        saved = position.to_json()
        self._commit(pending, extra_kv={self.position_key: saved})
        self._saved_position = saved

    def follow_step_times(self) -> None:
        """Judge this node against the fleet on the training steps reported since the last look.
        A straggler is a condition: one event when it starts, an audited clearance when it ends.
        The file offset is saved with those commits, so a restart does not report an episode
        again (lines after the last transition are judged again, which is harmless)."""
        if self.stragglers is None:
            return
        key = condition_key(FaultKind.STRAGGLER, None)
        pending: list[tuple[FaultEvent, Classification]] = []
        verdict = None
        for verdict in self.stragglers.verdicts():
            active = key in self.conditions.active
            if verdict.straggler and not active:
                pending.append(self._condition_event(
                    Observed(FaultKind.STRAGGLER, None, round(verdict.relative_perf, 3),
                             f"straggler while training: {verdict.describe()}"), "train"))
            elif not verdict.straggler and active:
                self._clear(key, f"back with the fleet: {verdict.describe()}")
        if verdict is not None:
            self.metrics.straggler_window(verdict.compute_s, verdict.comm_s, verdict.relative_perf)
        if pending or self._conditions_dirty:
            self._commit(pending, extra_kv={self.step_times_key: str(self.stragglers.follower.offset)})

    def _unparsed(self, line: str, why: str) -> None:
        """A kernel-log line skipped: counted always, logged for the first few of this run."""
        self.metrics.kernel_log_unparsed.labels(self.node).inc()
        self._unparsed_logged += 1
        if self._unparsed_logged <= UNPARSED_LOG_LIMIT:
            log.warning("%s: cannot read kernel-log line, skipped (%s): %.300r", self.node, why, line)
        elif self._unparsed_logged == UNPARSED_LOG_LIMIT + 1:
            log.warning("%s: further unreadable kernel-log lines are only counted "
                        "(aidc_kernel_log_unparsed_lines_total)", self.node)

    def _from_kernel(self, fault: KernelFault) -> tuple[FaultEvent, Classification] | None:
        gpu = self.pci_to_gpu.get(fault.pci) if fault.pci else None
        if fault.kind == FaultKind.XID:
            duplicate = self._duplicate_xid(fault.xid, fault.pci, "kmsg")
            # A held NVML event of this XID gives way to this line, which states the action.
            if not self._take_held((fault.xid, fault.pci)) and duplicate:
                return None
        cls = self.catalog.classify_kernel(fault.kind, fault.xid, fault.message, fault.severity)
        if fault.kind == FaultKind.XID:
            self.metrics.xid(gpu, fault.pci, fault.xid)
        lost_key = condition_key(FaultKind.FALLEN_OFF_BUS, gpu)
        if fault.kind == FaultKind.FALLEN_OFF_BUS and lost_key in self.conditions.active:
            return None  # already reported by the poller (GPU lost)
        if gpu is not None and (fault.kind == FaultKind.FALLEN_OFF_BUS or
                                (fault.kind == FaultKind.XID and fault.xid == 79)):
            # The GPU is gone: the poller's "lost" is the same fault, not a new one.
            self._set_condition(FaultKind.FALLEN_OFF_BUS, gpu, True, fault.message, cls.action)
        what = f"XID {fault.xid}" if fault.xid is not None else fault.kind.value
        message = f"{what} on {fault.pci or 'unknown PCI'}: {cls.reason} -> {cls.action.value}"
        return FaultEvent(self.node, fault.kind, cls.action, message, "kmsg", gpu=gpu, pci=fault.pci,
                          xid=fault.xid, line=fault.line), cls

    def _duplicate_xid(self, xid: int, pci: str | None, source: str) -> bool:
        """True when the other source reported this XID on this GPU within the window."""
        now = self.clock()
        self._recent_xids = [r for r in self._recent_xids if now - r[2] < XID_DEDUPE_WINDOW_S]
        key = (xid, pci)
        for i, (k, src, _t) in enumerate(self._recent_xids):
            if k == key and src != source:
                del self._recent_xids[i]  # one report from each source pairs off once
                return True
        self._recent_xids.append((key, source, now))
        return False

    def _take_held(self, key: tuple[int, str | None]) -> bool:
        """Drop the oldest held NVML event with this key; True if there was one."""
        for i, held in enumerate(self._held):
            if held[0] == key:
                del self._held[i]
                return True
        return False

    def _release_held(self, everything: bool = False) -> None:
        """Report held NVML events whose kernel line did not come within the dedupe window."""
        now = self.clock()
        due, waiting = [], []
        for held in self._held:
            (due if everything or now - held[3] >= XID_DEDUPE_WINDOW_S else waiting).append(held)
        if not due:
            return
        self._held = waiting
        for _key, event, _cls, _seen in due:
            self.metrics.xid(event.gpu, event.pci, event.xid)
        self._commit([(event, cls) for _key, event, cls, _seen in due])

    def handle_observation(self, obs: Observation) -> None:
        pending: list[tuple[FaultEvent, Classification]] = []
        hang_key = condition_key(FaultKind.DEVICE_HANG, None)
        hung_now = self.dev.hung_calls
        if hung_now > self._hung_seen:
            self.metrics.hung_total.labels(self.node).inc(hung_now - self._hung_seen)
            self._hung_seen = hung_now
        if obs.hang:
            self.metrics.monitor_hung.labels(self.node).set(1)
            if hang_key not in self.conditions.active:
                pending.append(self._condition_event(Observed(FaultKind.DEVICE_HANG, None, True, obs.hang),
                                                     "watchdog"))
        else:
            self.metrics.monitor_hung.labels(self.node).set(0)
            if hang_key in self.conditions.active and (obs.telemetry or obs.lost):
                self._clear(hang_key, "device calls answer again")
        for index, t in obs.telemetry.items():
            self.metrics.update_gpu(t)
            if t.pci_bus_id:
                self.pci_to_gpu[normalize_pci(t.pci_bus_id)] = index
            seen = {o.key: o for o in telemetry_conditions(t)}
            for key in self.conditions.gpu_keys(index):
                if key not in seen:
                    self._clear(key, "telemetry no longer shows it")
            for key, o in seen.items():
                current = self.conditions.active.get(key)
                if current is None or worsened(o.kind, current.value, o.value):
                    pending.append(self._condition_event(o, "device"))
                elif current.value != o.value:
                    current.value = o.value
                    self._conditions_dirty = True
        # XIDs before lost GPUs: an XID 79 and the lost GPU it explains are one fault, as on
        # the kernel-log path, so the XID sets the condition and the lost GPU adds no event.
        for x in obs.xids:
            pci = normalize_pci(x.pci_bus_id)
            if self._duplicate_xid(x.xid, pci, "device"):
                continue
            cls = self.catalog.classify_xid(x.xid)
            event = FaultEvent(self.node, FaultKind.XID, cls.action,
                               f"XID {x.xid} on {pci} (NVML event): {cls.reason} -> {cls.action.value}",
                               "device", gpu=x.gpu, pci=pci, xid=x.xid)
            if x.xid == 79:
                self._set_condition(FaultKind.FALLEN_OFF_BUS, x.gpu, True, event.message, cls.action)
            if self.follower is not None and self.catalog.follows_stated(x.xid):
                # The event has no text, so it cannot say which action the driver states
                # (contact_support by default); its kernel line can, and usually follows
                # within the dedupe window. Hold the event that long rather than emit it
                # and then either drop the line as a duplicate or emit a second,
                # contradicting event. Without its line it is still reported (_release_held).
                self._held.append(((x.xid, pci), event, cls, self.clock()))
                continue
            self.metrics.xid(x.gpu, pci, x.xid)
            pending.append((event, cls))
        for index, why in obs.lost.items():
            self.metrics.set_lost(index, True)
            if condition_key(FaultKind.FALLEN_OFF_BUS, index) not in self.conditions.active:
                pending.append(self._condition_event(Observed(FaultKind.FALLEN_OFF_BUS, index, True, why), "device"))
        for e in obs.errors:
            log.warning("%s: device poll error: %s", self.node, e)
        extra = None
        if obs.ib_ports is not None:
            extra = self._ib_ports(obs.ib_ports, pending)
        self._commit(pending, extra_kv=extra)

    # InfiniBand ---------------------------------------------------------------------
    def _ib_ports(self, ports: list[IbPort], pending: list) -> dict | None:
        """Export the ports; a port seen ACTIVE that is not is `ib_port_down`, link_downed
        growing past the thresholds file's rate is `ib_link_flapping`; both clear when they
        no longer hold. Returns the store update for ports newly seen up."""
        self.metrics.update_ib(ports)
        now = time.monotonic()
        newly_up = False
        for p in ports:
            down_key, flap_key = f"{FaultKind.IB_PORT_DOWN.value}:{p.name}", f"{FaultKind.IB_LINK_FLAPPING.value}:{p.name}"
            if p.up:
                if p.name not in self.ib_seen_up:
                    self.ib_seen_up.add(p.name)
                    newly_up = True
                self._clear(down_key, "the port is ACTIVE again")
            elif p.up is False and p.name in self.ib_seen_up and down_key not in self.conditions.active:
                pending.append(self._port_event(FaultKind.IB_PORT_DOWN, down_key, p.state,
                                                f"InfiniBand {p.name}: port {p.state_name} "
                                                f"(physical {p.phys_state_name or 'unknown'}), was ACTIVE"))
            downed = p.counters.get("link_downed")
            if downed is None:
                continue
            downs = self.flaps.observe(p.name, downed, now)
            if self.flaps.flapping(downs) and flap_key not in self.conditions.active:
                pending.append(self._port_event(
                    FaultKind.IB_LINK_FLAPPING, flap_key, downs,
                    f"InfiniBand {p.name}: {downs} link-down transitions within {self.fabric.flap_window_s:g} s "
                    f"(threshold {self.fabric.flap_downs}, fabric thresholds {self.fabric.version})"))
            elif not self.flaps.flapping(downs) and self.flaps.watched_a_whole_window(p.name, now):
                self._clear(flap_key, "link-down transitions under the threshold for a whole window")
        return {self.ib_seen_up_key: json.dumps(sorted(self.ib_seen_up))} if newly_up else None

    def _port_event(self, kind: FaultKind, key: str, value, message: str) -> tuple[FaultEvent, Classification]:
        cls = self.catalog.classify_fault(kind)
        self.conditions.active[key] = Condition(kind.value, None, value, message, cls.action.value, time.time())
        return FaultEvent(self.node, kind, cls.action, f"{message} -> {cls.action.value}", "sysfs"), cls

    # node checks: burn-in certificate, checkpoint volume, audit log -----------------------
    def _once(self, what: str, message: str) -> None:
        if what not in self._node_check_logged:
            self._node_check_logged.add(what)
            log.warning("%s: %s", self.node, message)

    def node_checks(self, now: float | None = None) -> None:
        """The slow-moving node metrics, each at most every NODE_CHECK_INTERVAL_S (the audit
        log's verification every AUDIT_VERIFY_INTERVAL_S). A check that cannot be made leaves
        its metric absent and is logged once."""
        now = time.monotonic() if now is None else now
        if now >= self._next_node_check:
            self._next_node_check = now + NODE_CHECK_INTERVAL_S
            self._burnin_certificate()
            for path in self.checkpoint_paths:
                try:
                    st = os.statvfs(path)
                except OSError as exc:
                    try:
                        self.metrics.checkpoint_used.remove(self.node, path)
                    except KeyError:  # never measured
                        pass
                    self._once(f"statvfs:{path}", f"checkpoint volume {path}: {exc.strerror or exc}; "
                                                  "aidc_checkpoint_volume_used_ratio left out")
                    continue
                used = st.f_blocks - st.f_bfree
                usable = used + st.f_bavail  # as df counts it: blocks reserved for root are not usable
                self.metrics.checkpoint_used.labels(self.node, path).set(used / usable if usable else 0.0)
        if now >= self._next_audit_verify:
            self._next_audit_verify = now + AUDIT_VERIFY_INTERVAL_S
            result = self.audit.verify()
            self.metrics.audit_verify_ok.labels(self.node).set(1 if result.ok else 0)
            if not result.ok:
                self._once("audit", f"audit log {self.audit.path} does not verify{result.failure}")

    def _burnin_certificate(self) -> None:
        from aidc.burnin.certificate import RECORD_KIND

        record = self.audit.latest_stored(RECORD_KIND, self.node)
        if record is None:
            return  # never burned in: no verdict to export
        try:
            payload = json.loads(record["payload"])
            verdict = payload["verdict"]
            collectives = payload.get("collectives") or {}
            if verdict not in ("pass", "fail") or not isinstance(collectives, dict):
                raise ValueError(f"verdict {verdict!r}")
            fractions = {}
            for name, rows in collectives.items():
                if rows:  # the largest message size is the bandwidth figure, as in nccl-tests' summaries
                    fractions[str(name)] = float(max(rows, key=lambda r: r["bytes"])["link_fraction"])
            relative = _relative_to_fleet(payload.get("metrics") or {}, (payload.get("fleet") or {}).get("stats") or {})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._once(f"certificate:{record['seq']}", f"burn-in certificate (audit record {record['seq']}) "
                                                       f"is not readable ({exc!r}); aidc_burnin_* left out")
            return
        self.metrics.burnin_passed.labels(self.node).set(1 if verdict == "pass" else 0)
        self.metrics.burnin_link_fraction.clear()
        for name, fraction in fractions.items():
            self.metrics.burnin_link_fraction.labels(self.node, name).set(fraction)
        # One series per burn-in metric (test=<metric>); the training judgement's own series
        # (test="train_step") is not the certificate's to remove.
        for test in self._certificate_tests - relative.keys():
            self.metrics.relative_perf.remove(self.node, test)
        for test, value in relative.items():
            self.metrics.relative_perf.labels(self.node, test).set(value)
        self._certificate_tests = set(relative)

    # conditions -------------------------------------------------------------------
    def _set_condition(self, kind: FaultKind, gpu: int | None, value, message: str, action: Action) -> None:
        key = condition_key(kind, gpu)
        if key not in self.conditions.active:
            self.conditions.active[key] = Condition(kind.value, gpu, value, message, action.value, time.time())
            self._conditions_dirty = True

    def _condition_event(self, o: Observed, source: str) -> tuple[FaultEvent, Classification]:
        cls = self.catalog.classify_fault(o.kind)
        self.conditions.active[o.key] = Condition(o.kind.value, o.gpu, o.value, o.message, cls.action.value,
                                                  time.time())
        pci = None
        if o.gpu is not None:
            pci = next((p for p, g in self.pci_to_gpu.items() if g == o.gpu), None)
        event = FaultEvent(self.node, o.kind, cls.action, f"{o.message} -> {cls.action.value}", source,
                           gpu=o.gpu, pci=pci)
        return event, cls

    def _clear(self, key: str, why: str) -> None:
        cond = self.conditions.active.pop(key, None)
        if cond is None:
            return
        if cond.kind == FaultKind.FALLEN_OFF_BUS.value and cond.gpu is not None:
            self.metrics.set_lost(cond.gpu, False)
        self._conditions_dirty = True
        self.audit.append("health.cleared", f"{cond.kind} cleared: {why}", actor=self.actor, node=self.node,
                          payload={"kind": cond.kind, "gpu": cond.gpu, "since": cond.since})

    # writing ----------------------------------------------------------------------
    _conditions_dirty = False

    def _commit(self, pending: list[tuple[FaultEvent, Classification]], extra_kv: dict | None = None) -> None:
        """Events, conditions and the kernel-log position in one store transaction, each event
        audited inside it before it commits; then metrics. A kill between the audit record and
        the commit leaves a record of an event that was not stored (the restarted agent reads
        those lines again and records them again), never a stored event without its record."""
        if not pending and not extra_kv and not self._conditions_dirty:
            return
        with self.store.transaction():
            ids = [self.store.append(event, source=self.node) for event, _ in pending]
            if pending or self._conditions_dirty:
                self.store.put(self.conditions.key, self.conditions.to_json())
            for k, v in (extra_kv or {}).items():
                self.store.put(k, v)
            for event_id, (event, cls) in zip(ids, pending):
                self.audit.append("health.fault", event.message, actor=self.actor, node=self.node,
                                  payload={"event_id": event_id, "kind": event.kind.value,
                                           "action": event.action.value, "gpu": event.gpu, "pci": event.pci,
                                           "xid": event.xid, "line": event.line, "source": event.source,
                                           "catalog_version": cls.catalog_version})
        self._conditions_dirty = False
        for event, _ in pending:
            self.emitted += 1
            self.metrics.fault(event.kind.value, event.action.value)

    def close(self) -> None:
        if self.follower:
            self.follower.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.metrics.shutdown()


def run_agent(node: str, backend: DeviceBackend, kernel_log: str | Path | None, store: Store | str | Path,
              audit: AuditLog | str | Path, port: int | None, poll_interval_s: float, stop: threading.Event, *,
              device_timeout_s: float = 2.0, catalog: XidCatalog | None = None,
              ready: threading.Event | None = None, listen_address: str = "127.0.0.1",
              metrics_tls=None, checkpoint_paths: tuple[str, ...] = (),
              dcgm_exporter_present: bool = False, step_times: str | Path | None = None,
              straggler_policy=None, stall_after_s: float = DEFAULT_STALL_AFTER_S) -> HealthAgent:
    """Run the watch loop until `stop` is set. `port` None or 0: no metrics server; the server
    listens on `listen_address` (loopback by default; 0.0.0.0 or the pod IP in a DaemonSet),
    over HTTPS with `metrics_tls` (an aidc.runbook.tls.TLSConfig), and answers /healthz (the
    loop turned within `stall_after_s`) and /readyz (the first device read handled and the
    kernel log being followed, and live).
    Returns the (closed) agent, for its counters."""
    own_store = not isinstance(store, Store)
    own_audit = not isinstance(audit, AuditLog)
    store = Store(store) if own_store else store
    audit = AuditLog(audit) if own_audit else audit
    agent = HealthAgent(node, backend, kernel_log, store, audit, poll_interval_s=poll_interval_s,
                        device_timeout_s=device_timeout_s, catalog=catalog, checkpoint_paths=checkpoint_paths,
                        dcgm_exporter_present=dcgm_exporter_present, step_times=step_times,
                        straggler_policy=straggler_policy)
    probe = Probe("agent", stall_after_s)
    halt = threading.Event()
    poller = threading.Thread(target=agent.poller, args=(halt,), name=f"device-poller-{node}", daemon=True)
    try:
        if agent.kernel_log and os.path.exists(agent.kernel_log) and not os.access(agent.kernel_log, os.R_OK):
            raise AidcError(f"kernel log {agent.kernel_log} is not readable by this user")
        if port:
            try:
                agent.metrics.serve(port, addr=listen_address, tls=metrics_tls, probe=probe)
            except OSError as exc:
                raise AidcError(f"cannot serve metrics on {listen_address}:{port}: {exc.strerror or exc}") from None
        audit.append("health.agent_started", f"watching {node}", actor=agent.actor, node=node,
                     payload={"backend": agent.dev.name, "kernel_log": agent.kernel_log, "port": port,
                              "listen_address": listen_address,
                              "poll_interval_s": poll_interval_s, "catalog_version": agent.catalog.version,
                              "active_conditions": sorted(agent.conditions.active)})
        poller.start()
        # Startup only: learn the GPUs (PCI address -> index) before reading the kernel log,
        # so the first lines are attributed to their GPU. Bounded: a hung device answers
        # with an observation (the hang) within the device timeout.
        try:
            agent.handle_observation(agent.observations.get(timeout=device_timeout_s + poll_interval_s))
        except queue.Empty:
            pass
        agent.step(0.0)  # the kernel log's first read (and its watch) before saying ready
        probe.ready(node=node, kernel_log=agent.kernel_log, backend=agent.dev.name)
        probe.turned()
        if ready is not None:
            ready.set()
        while not stop.is_set():
            agent.step(wait_s=min(poll_interval_s, MAX_BLOCK_S))
            probe.turned()
        agent.step(0.0, final=True)  # what arrived while stopping is still recorded
        audit.append("health.agent_stopped", f"stopped watching {node}", actor=agent.actor, node=node,
                     payload={"events_emitted": agent.emitted, "active_conditions": sorted(agent.conditions.active)})
    finally:
        halt.set()
        if poller.is_alive():
            poller.join(timeout=device_timeout_s + poll_interval_s + 1.0)
        agent.close()
        agent.dev.close()
        if own_store:
            store.close()
        if own_audit:
            audit.close()
    return agent


def _relative_to_fleet(metrics: dict, stats: dict) -> dict[str, float]:
    """A certificate's figures against the fleet median of the same burn-in (every burn-in metric
    is better higher: TFLOP/s, GB/s, operations/s), as aidc_burnin_relative_perf's values."""
    out = {}
    for name, value in metrics.items():
        median = (stats.get(name) or {}).get("median")
        if isinstance(value, (int, float)) and isinstance(median, (int, float)) and median > 0:
            out[str(name)] = round(float(value) / float(median), 4)
    return out
