"""The node agent's watch loop.

Two loops, so that a sick GPU cannot blind the kernel-log path: a device poller thread
reads telemetry and NVML XID events through `TimedBackend` (a call past its timeout is a
`device_hang` fault, and the poller carries on), and the main loop follows the kernel
log every `poll_interval_s` and handles what the poller observed. Only the main loop
writes: fault events go to the durable store together with the kernel-log position and
the active conditions, in one transaction, then to the audit log and the metrics. No
wait in either loop is longer than `poll_interval_s`, so a kernel-log line becomes an
event in the store within about one poll interval.
"""

from __future__ import annotations

import logging
import os
import queue
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
from aidc.health.kmsg import KernelFault, KernelLogFollower, KernelLogParser, Position, normalize_pci
from aidc.health.stragglers import StragglerWatch
from aidc.store import Store

log = logging.getLogger("aidc.health")

XID_DEDUPE_WINDOW_S = 5.0  # the same XID from NVML and the kernel log within this window is one fault
UNPARSED_LOG_LIMIT = 10  # unreadable kernel-log lines logged per agent run; all are counted in the metric
LOST_MARKERS = ("fallen off the bus", "is lost", "gpu_is_lost", "gpu is lost")


@dataclass
class Observation:
    """One device poll, as the poller saw it."""

    telemetry: dict[int, GpuTelemetry] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    xids: list[XidEvent] = field(default_factory=list)
    hang: str | None = None


def poll_device(dev: TimedBackend) -> Observation:
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
    except DeviceError as exc:
        obs.errors.append(str(exc))
    return obs


class HealthAgent:
    def __init__(self, node: str, backend: DeviceBackend, kernel_log: str | Path | None, store: Store,
                 audit: AuditLog, *, poll_interval_s: float = 1.0, device_timeout_s: float = 2.0,
                 catalog: XidCatalog | None = None, metrics: HealthMetrics | None = None,
                 step_times: str | Path | None = None, straggler_policy=None):
        self.node = node
        self.dev = backend if isinstance(backend, TimedBackend) else TimedBackend(backend, device_timeout_s)
        self.store, self.audit = store, audit
        self.poll_interval_s = poll_interval_s
        self.catalog = catalog or load_catalog()
        self.metrics = metrics or HealthMetrics(node, self.dev.name)
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
        self.pci_to_gpu: dict[str, int] = {}
        self._recent_xids: list[tuple[tuple[int, str | None], str, float]] = []
        # NVML events of follow_stated XIDs waiting for their kernel line: (key, event, cls, seen at).
        self._held: list[tuple[tuple[int, str | None], FaultEvent, Classification, float]] = []
        self.clock = time.monotonic  # for the dedupe window; tests replace it
        self._hung_seen = 0
        self.emitted = 0
        # Training stragglers: the trainer's step-time file for this node (aidc.health.stragglers).
        self.stragglers: StragglerWatch | None = None
        if step_times:
            from aidc.spec import StragglerPolicy

            self.step_times_key = f"health.step_times:{node}:{step_times}"
            self.stragglers = StragglerWatch(node, step_times, straggler_policy or StragglerPolicy(),
                                             int(store.get(self.step_times_key) or 0))
            self.stragglers.judge.straggling = condition_key(FaultKind.STRAGGLER, None) in self.conditions.active
        for c in self.conditions.active.values():  # a lost GPU stays lost across restarts
            if c.kind == FaultKind.FALLEN_OFF_BUS.value and c.gpu is not None:
                self.metrics.set_lost(c.gpu, True)

    # device poller (its own thread) -------------------------------------------
    def poller(self, halt: threading.Event) -> None:
        while not halt.is_set():
            started = time.monotonic()
            obs = poll_device(self.dev)
            while not halt.is_set():  # bounded queue: a slow main loop slows the poller, not memory
                try:
                    self.observations.put(obs, timeout=self.poll_interval_s)
                    break
                except queue.Full:
                    continue
            halt.wait(max(0.0, self.poll_interval_s - (time.monotonic() - started)))

    # main loop ------------------------------------------------------------------
    def step(self, wait_s: float = 0.0, *, final: bool = False) -> int:
        """Follow the kernel log once, then handle device observations for up to `wait_s`.
        `final`: the agent is stopping, so held NVML events are reported now, not lost."""
        before = self.emitted
        while True:  # what the poller already saw first: it maps PCI addresses to GPUs
            try:
                self.handle_observation(self.observations.get_nowait())
            except queue.Empty:
                break
        self.follow_kernel_log()
        self.follow_step_times()
        deadline = time.monotonic() + wait_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                obs = self.observations.get(timeout=remaining) if remaining > 0 else self.observations.get_nowait()
            except queue.Empty:
                break
            self.handle_observation(obs)
        self._release_held(everything=final)
        self.metrics.quarantined.labels(self.node).set(
            1 if self.store.node_state(self.node) in ("quarantining", "quarantined") else 0)
        return self.emitted - before

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
        self._commit(pending)

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
            ids = [self.store.append(event) for event, _ in pending]
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
        self.metrics.shutdown()


def run_agent(node: str, backend: DeviceBackend, kernel_log: str | Path | None, store: Store | str | Path,
              audit: AuditLog | str | Path, port: int | None, poll_interval_s: float, stop: threading.Event, *,
              device_timeout_s: float = 2.0, catalog: XidCatalog | None = None,
              ready: threading.Event | None = None, listen_address: str = "127.0.0.1",
              metrics_tls=None, step_times: str | Path | None = None, straggler_policy=None) -> HealthAgent:
    """Run the watch loop until `stop` is set. `port` None or 0: no metrics server; the server
    listens on `listen_address` (loopback by default; 0.0.0.0 or the pod IP in a DaemonSet),
    over HTTPS with `metrics_tls` (an aidc.runbook.tls.TLSConfig).
    Returns the (closed) agent, for its counters."""
    own_store = not isinstance(store, Store)
    own_audit = not isinstance(audit, AuditLog)
    store = Store(store) if own_store else store
    audit = AuditLog(audit) if own_audit else audit
    agent = HealthAgent(node, backend, kernel_log, store, audit, poll_interval_s=poll_interval_s,
                        device_timeout_s=device_timeout_s, catalog=catalog, step_times=step_times,
                        straggler_policy=straggler_policy)
    halt = threading.Event()
    poller = threading.Thread(target=agent.poller, args=(halt,), name=f"device-poller-{node}", daemon=True)
    try:
        if agent.kernel_log and os.path.exists(agent.kernel_log) and not os.access(agent.kernel_log, os.R_OK):
            raise AidcError(f"kernel log {agent.kernel_log} is not readable by this user")
        if port:
            try:
                agent.metrics.serve(port, addr=listen_address, tls=metrics_tls)
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
        if ready is not None:
            ready.set()
        while not stop.is_set():
            agent.step(wait_s=poll_interval_s)
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
