"""The watch agent against a simulated node: faults injected with aidc.device.sim.inject become
typed events in the durable store, audit records and Prometheus metrics over HTTP."""

from __future__ import annotations

import pytest

from aidc.audit.log import AuditLog
from aidc.device import sim
from aidc.device.base import XidEvent
from aidc.device.sim import SimBackend
from aidc.events import Action, FaultKind
from aidc.health.agent import XID_DEDUPE_WINDOW_S, HealthAgent, Observation, poll_device
from aidc.store import Store

from tests.health.conftest import free_port, metric_value, opened_audit, scrape, wait_for


SENTINEL_XID = 43


def write_sentinel(node_dir):
    """A harmless XID line appended to the kernel log, to know when earlier lines were read."""
    with open(node_dir / "kern.log", "a") as log:
        log.write(f"NVRM: Xid (PCI:0000:17:00): {SENTINEL_XID}, pid=1, name=sentinel, Ch 00000001\n")


def test_xid_79_becomes_a_reboot_node_event_in_the_store_and_counts_in_the_metrics(sim_node, agent_run, tmp_path):
    port = free_port()
    with agent_run(sim_node, port=port) as run:
        wait_for(lambda: metric_value(scrape(port), "DCGM_FI_DEV_GPU_TEMP", gpu="1") is not None)
        sim.inject(sim_node, "xid", gpu=1, xid=79)
        wait_for(lambda: [e for e in run.events() if e.xid == 79])
        write_sentinel(sim_node)  # the kernel path reads in order: past it, the XID 79 line was read
        wait_for(lambda: [e for e in run.events() if e.xid == SENTINEL_XID])
        text = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_gpu_lost", gpu="1") == 1.0
                        and metric_value(t, "aidc_faults_total", kind="xid") is not None and t)
    events = [e for e in run.events() if e.xid == 79]
    assert len(events) == 1, "the same XID from NVML events and the kernel log is one fault"
    xid79 = events[0]
    assert (xid79.kind, xid79.action, xid79.gpu, xid79.pci) == (FaultKind.XID, Action.REBOOT_NODE, 1, "0000:27:00.0")
    assert metric_value(text, "aidc_xid_errors_total", xid="79", gpu="1") == 1.0
    assert metric_value(text, "DCGM_FI_DEV_XID_ERRORS", gpu="1") == 79.0
    assert metric_value(text, "aidc_faults_total", kind="xid", action="reboot_node") == 1.0
    assert metric_value(text, "aidc_agent_info", Hostname="node-a", backend="sim") == 1.0
    with opened_audit(tmp_path / "audit.db") as audit:
        faults = audit.records(kind="health.fault", node="node-a")
        assert any(r.payload["xid"] == 79 and r.payload["action"] == "reboot_node" for r in faults)
        assert audit.verify().ok


def test_a_kernel_log_line_alone_is_detected_with_its_line_and_classified(sim_node, agent_run):
    with agent_run(sim_node) as run:
        line = "[ 2001.000001] NVRM: Xid (PCI:0000:17:00): 13, pid=2317, name=python, Ch 00000008, Graphics Exception"
        with open(sim_node / "kern.log", "a") as log:
            log.write(line + "\n")
        (event,) = wait_for(lambda: [e for e in run.events() if e.xid == 13])
    assert (event.action, event.source, event.line, event.gpu) == (Action.RESTART_APP, "kmsg", line, 0)


def test_double_bit_ecc_gives_an_xid_48_and_an_ecc_dbe_event_both_reset_gpu(sim_node, agent_run):
    port = free_port()
    with agent_run(sim_node, port=port) as run:
        wait_for(lambda: metric_value(scrape(port), "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu="0") == 0.0)
        sim.inject(sim_node, "ecc_dbe", gpu=0)
        events = wait_for(lambda: (ev := run.events()) and {e.kind for e in ev} >= {
            FaultKind.XID, FaultKind.ECC_DBE, FaultKind.ROW_REMAP_PENDING} and ev)
        text = scrape(port)
    assert {(e.kind, e.action) for e in events} == {(FaultKind.XID, Action.RESET_GPU),
                                                    (FaultKind.ECC_DBE, Action.RESET_GPU),
                                                    (FaultKind.ROW_REMAP_PENDING, Action.RESET_GPU)}
    assert metric_value(text, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu="0") == 1.0
    assert metric_value(text, "DCGM_FI_DEV_ROW_REMAP_PENDING", gpu="0") == 1.0


def test_a_hung_device_call_is_a_device_hang_fault_and_the_kernel_log_is_still_followed(sim_node, agent_run):
    port = free_port()
    with agent_run(sim_node, port=port, device_timeout_s=0.3) as run:
        wait_for(lambda: metric_value(scrape(port), "aidc_monitor_hung") == 0.0)
        sim.inject(sim_node, "hang", seconds=4.0)
        (hang,) = wait_for(lambda: [e for e in run.events() if e.kind == FaultKind.DEVICE_HANG])
        # While the device is hung, a kernel-log line still becomes an event.
        with open(sim_node / "kern.log", "a") as log:
            log.write("NVRM: Xid (PCI:0000:27:00): 109, pid=1, name=python, Ch 00000008, errorString CTX SWITCH TIMEOUT\n")
        wait_for(lambda: [e for e in run.events() if e.xid == 109])
        # Several calls hang in a row, and the hang is one fault, not one per call.
        hung_text = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_device_call_hung_total") >= 3 and t)
        during = [e.kind for e in run.events()].count(FaultKind.DEVICE_HANG)
        # When calls answer again, the hang clears.
        wait_for(lambda: metric_value(scrape(port), "aidc_monitor_hung") == 0.0)
    assert (hang.action, hang.source) == (Action.REBOOT_NODE, "watchdog")
    assert metric_value(hung_text, "aidc_monitor_hung") == 1.0
    assert during == 1


def test_thermal_throttle_is_recorded_with_action_ignore_and_exported(sim_node, agent_run):
    port = free_port()
    with agent_run(sim_node, port=port) as run:
        wait_for(lambda: metric_value(scrape(port), "aidc_gpu_thermal_throttled", gpu="1") == 0.0)
        sim.inject(sim_node, "thermal", gpu=1)
        (event,) = wait_for(lambda: [e for e in run.events() if e.kind == FaultKind.THERMAL_THROTTLE])
        text = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_gpu_thermal_throttled", gpu="1") == 1
                        and t)
    assert (event.action, event.gpu) == (Action.IGNORE, 1)
    assert metric_value(text, "DCGM_FI_DEV_GPU_TEMP", gpu="1") == 93.0
    # hw_thermal_slowdown (0x40) | sw_thermal_slowdown (0x20)
    assert metric_value(text, "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", gpu="1") == float(0x60)


def test_nvlink_down_and_fallen_off_bus_without_xid_are_caught(sim_node, agent_run):
    with agent_run(sim_node) as run:
        sim.inject(sim_node, "nvlink_down", gpu=0)
        sim.inject(sim_node, "fallen_off_bus", gpu=1)
        wait_for(lambda: {e.kind for e in run.events()} >= {FaultKind.NVLINK_DOWN, FaultKind.FALLEN_OFF_BUS})
        write_sentinel(sim_node)
        wait_for(lambda: [e for e in run.events() if e.xid == SENTINEL_XID])
        events = run.events()
    by_kind = {e.kind: e for e in events}
    assert by_kind[FaultKind.NVLINK_DOWN].action == Action.CONTACT_SUPPORT
    assert (by_kind[FaultKind.FALLEN_OFF_BUS].action, by_kind[FaultKind.FALLEN_OFF_BUS].gpu) == (Action.REBOOT_NODE, 1)
    assert [e.kind for e in events].count(FaultKind.FALLEN_OFF_BUS) == 1, "device and kernel log report one fault"


def test_a_restart_keeps_the_log_position_and_the_active_conditions(sim_node, agent_run, tmp_path):
    with agent_run(sim_node) as run:
        sim.inject(sim_node, "xid", gpu=0, xid=43)
        sim.inject(sim_node, "thermal", gpu=0)
        wait_for(lambda: {e.kind for e in run.events()} >= {FaultKind.XID, FaultKind.THERMAL_THROTTLE})
    before = run.events()
    # While the agent is down: one more line. After the restart it is read, the old ones are not.
    sim.inject(sim_node, "xid", gpu=1, xid=94)
    port = free_port()
    with agent_run(sim_node, port=port) as run2:
        wait_for(lambda: [e for e in run2.events() if e.xid == 94])
        text = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_gpu_thermal_throttled", gpu="0") == 1
                        and t)
        after = run2.events()
    assert "thermal_throttle:0" in run2.agent.conditions.active
    assert after[: len(before)] == before
    new = after[len(before):]
    assert [(e.kind, e.xid) for e in new] == [(FaultKind.XID, 94)], \
        "no XID repeated from the log and the standing thermal condition is not reported again"
    assert metric_value(text, "aidc_faults_total", kind="thermal_throttle", action="ignore") is None


def test_a_cleared_condition_is_audited_and_reported_again_when_it_returns(sim_node, agent_run, tmp_path):
    with agent_run(sim_node) as run:
        sim.inject(sim_node, "thermal", gpu=0)
        wait_for(lambda: [e for e in run.events() if e.kind == FaultKind.THERMAL_THROTTLE])
        sim.inject(sim_node, "clear")
        with opened_audit(tmp_path / "audit.db") as audit:
            wait_for(lambda: audit.records(kind="health.cleared", node="node-a"))
        sim.inject(sim_node, "thermal", gpu=0)
        wait_for(lambda: len([e for e in run.events() if e.kind == FaultKind.THERMAL_THROTTLE]) == 2)


# The agent driven by hand (no threads): which source is handled first is chosen by the test.

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def agent(sim_node, tmp_path):
    a = HealthAgent("node-a", SimBackend(sim_node), sim_node / "kern.log", Store(tmp_path / "store.db"),
                    AuditLog(tmp_path / "audit.db"))
    a.clock = FakeClock()
    a.handle_observation(poll_device(a.dev))  # learn PCI address -> GPU, as run_agent does at startup
    yield a
    a.close()
    a.dev.close()
    a.store.close()
    a.audit.close()


def handle_in_order(agent, first: str) -> None:
    if first == "kernel log":
        agent.follow_kernel_log()
        agent.handle_observation(poll_device(agent.dev))
    else:
        agent.handle_observation(poll_device(agent.dev))
        agent.follow_kernel_log()


def stored(agent):
    return [(e.kind, e.xid, e.action, e.gpu) for _, e, _ in agent.store.events("node-a")]


@pytest.mark.parametrize("first", ["kernel log", "device"])
def test_xid_79_and_the_lost_gpu_are_one_reboot_node_fault_whichever_source_is_handled_first(agent, sim_node, first):
    sim.inject(sim_node, "xid", gpu=1, xid=79)  # the kernel line, the NVML event and the lost GPU
    handle_in_order(agent, first)
    assert stored(agent) == [(FaultKind.XID, 79, Action.REBOOT_NODE, 1)]
    assert "fallen_off_bus:1" in agent.conditions.active, "the GPU stays known as lost"


@pytest.mark.parametrize("first", ["kernel log", "device"])
def test_xid_154_takes_the_action_the_driver_states_whichever_source_is_handled_first(agent, sim_node, first):
    sim.inject(sim_node, "xid", gpu=0, xid=154)  # "... to 0x2 (Node Reboot Required)"; NVML has no text
    handle_in_order(agent, first)
    assert stored(agent) == [(FaultKind.XID, 154, Action.REBOOT_NODE, 0)]


def test_xid_154_seen_by_the_poller_and_the_kernel_log_in_one_step_is_the_stated_action(agent, sim_node):
    sim.inject(sim_node, "xid", gpu=0, xid=154)
    agent.observations.put(poll_device(agent.dev))  # step() handles the poller's observations first
    agent.step(0.0)
    assert stored(agent) == [(FaultKind.XID, 154, Action.REBOOT_NODE, 0)]


def nvml_only_xid_154() -> Observation:
    """An NVML XID 154 event whose kernel-log line never arrives."""
    return Observation(xids=[XidEvent(0, "00000000:17:00.0", 154, 0.0)])


def test_an_nvml_xid_154_without_its_kernel_line_is_reported_to_a_human_once_the_window_is_over(agent):
    agent.observations.put(nvml_only_xid_154())
    agent.step(0.0)
    assert stored(agent) == [], "the kernel line that states the action may still come"
    agent.clock.now += XID_DEDUPE_WINDOW_S
    agent.step(0.0)
    assert stored(agent) == [(FaultKind.XID, 154, Action.CONTACT_SUPPORT, 0)]


def test_an_nvml_xid_154_still_waiting_when_the_agent_stops_is_reported_not_lost(agent):
    agent.observations.put(nvml_only_xid_154())
    agent.step(0.0, final=True)
    assert stored(agent) == [(FaultKind.XID, 154, Action.CONTACT_SUPPORT, 0)]


# A kernel-log line the parser cannot read: counted, logged once, skipped, never a stop.

UNREADABLE_LINES = [
    "[ 1890.5] nvidia-nvswitch0: SXid (PCI:::): 12028, Fatal, Link 32 egress non-posted PRIV error",
    "[ 1890.6] NVRM: Xid (PCI:0000:17:00): " + "9" * 5000 + ", pid=1, name=python",
]
XID79_LINE = "[ 1900.000001] NVRM: Xid (PCI:0000:27:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."


def unparsed_total(agent) -> float | None:
    return agent.metrics.registry.get_sample_value("aidc_kernel_log_unparsed_lines_total", {"Hostname": "node-a"})


def restarted(agent, sim_node) -> HealthAgent:
    """A new agent on the same store, as after a crash or a restart of the service."""
    agent.follower.close()
    return HealthAgent("node-a", SimBackend(sim_node), sim_node / "kern.log", agent.store, agent.audit)


def unreadable_warnings(caplog) -> list:
    return [r for r in caplog.records if r.name == "aidc.health" and "cannot read" in r.getMessage()]


def test_unreadable_lines_are_counted_skipped_and_the_xid_79_after_them_is_detected(agent, sim_node, caplog):
    with open(sim_node / "kern.log", "a") as log:
        log.write("".join(line + "\n" for line in UNREADABLE_LINES) + XID79_LINE + "\n")
    agent.follow_kernel_log()
    assert stored(agent) == [(FaultKind.XID, 79, Action.REBOOT_NODE, 1)]
    assert unparsed_total(agent) == len(UNREADABLE_LINES)
    assert len(unreadable_warnings(caplog)) == len(UNREADABLE_LINES), "each skipped line is logged once"


def test_after_an_unreadable_line_the_saved_position_is_past_it_so_a_restart_neither_rereads_nor_misses(
        agent, sim_node, caplog):
    with open(sim_node / "kern.log", "a") as log:
        log.write(UNREADABLE_LINES[0] + "\n")
    agent.follow_kernel_log()
    assert unparsed_total(agent) == 1
    # The agent restarts; the XID 79 is written while it is down.
    with open(sim_node / "kern.log", "a") as log:
        log.write(XID79_LINE + "\n")
    again = restarted(agent, sim_node)
    try:
        again.follow_kernel_log()
        assert stored(again) == [(FaultKind.XID, 79, Action.REBOOT_NODE, None)]
        assert unparsed_total(again) == 0, "the bad line is behind the saved position: not read again"
    finally:
        again.close()
    assert len(unreadable_warnings(caplog)) == 1, "logged once, not once per restart"


def test_a_flood_of_unreadable_lines_is_counted_in_full_but_logged_a_bounded_number_of_times(agent, sim_node, caplog):
    from aidc.health.agent import UNPARSED_LOG_LIMIT

    with open(sim_node / "kern.log", "a") as log:
        log.write((UNREADABLE_LINES[0] + "\n") * (UNPARSED_LOG_LIMIT * 3) + XID79_LINE + "\n")
    agent.follow_kernel_log()
    assert unparsed_total(agent) == UNPARSED_LOG_LIMIT * 3
    assert len(unreadable_warnings(caplog)) == UNPARSED_LOG_LIMIT
    assert any("only counted" in r.getMessage() for r in caplog.records if r.name == "aidc.health")
    assert [e[1] for e in stored(agent)] == [79]


def test_a_fault_the_agent_cannot_handle_is_skipped_like_an_unreadable_line(agent, sim_node, monkeypatch):
    # Whatever goes wrong between a line and its event, the lines after it are still read.
    class FailsOnXid13:
        def __init__(self, catalog):
            self.catalog = catalog

        def __getattr__(self, name):
            return getattr(self.catalog, name)

        def classify_kernel(self, kind, xid, *args, **kw):
            if xid == 13:
                raise ValueError("catalog cannot classify this one")
            return self.catalog.classify_kernel(kind, xid, *args, **kw)

    monkeypatch.setattr(agent, "catalog", FailsOnXid13(agent.catalog))
    with open(sim_node / "kern.log", "a") as log:
        log.write("[ 1.0] NVRM: Xid (PCI:0000:17:00): 13, pid=1, name=python, Ch 00000008\n" + XID79_LINE + "\n")
    agent.follow_kernel_log()
    assert [e[1] for e in stored(agent)] == [79]
    assert unparsed_total(agent) == 1


def test_the_running_agent_exports_the_unreadable_line_count_and_detects_past_it_across_a_restart(sim_node, agent_run):
    port = free_port()
    with agent_run(sim_node, port=port) as run:
        with open(sim_node / "kern.log", "a") as log:
            log.write(UNREADABLE_LINES[0] + "\n" + XID79_LINE + "\n")
        wait_for(lambda: [e for e in run.events() if e.xid == 79])
        assert metric_value(scrape(port), "aidc_kernel_log_unparsed_lines_total", Hostname="node-a") == 1.0
    with open(sim_node / "kern.log", "a") as log:  # while the agent is down
        log.write(UNREADABLE_LINES[1] + "\n" + XID79_LINE.replace("0000:27:00", "0000:17:00") + "\n")
    port = free_port()
    with agent_run(sim_node, port=port) as run2:
        wait_for(lambda: [e for e in run2.events() if e.xid == 79 and e.gpu == 0])
        text = scrape(port)
    assert [(e.xid, e.gpu) for e in run2.events() if e.xid == 79] == [(79, 1), (79, 0)], "none lost, none repeated"
    assert metric_value(text, "aidc_kernel_log_unparsed_lines_total", Hostname="node-a") == 1.0, \
        "only the line written while it was down: the first is behind the saved position"
