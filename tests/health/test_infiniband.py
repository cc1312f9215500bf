"""InfiniBand port health: sysfs is read as the kernel writes it (the H100 sysfs fixture), bad
files leave only their metric out, and a port going down or flapping is a fault event. The
lab's simulated ports follow <node_dir>/links.json."""

from __future__ import annotations

import json
import logging

import pytest

from aidc.device import sim
from aidc.device.sim import SimBackend
from aidc.errors import SpecError
from aidc.events import Action, FaultKind
from aidc.health.infiniband import FabricThresholds, FlapDetector, IbSysfsReader, load_thresholds
from aidc.store import Store
from tests.ansible.ansible_sandbox import fake_sysfs
from tests.health.conftest import free_port, metric_value, scrape, wait_for


def test_every_port_of_the_h100_fixture_is_read_with_state_rate_and_counters(tmp_path):
    root = fake_sysfs(tmp_path / "sys", hcas=8)
    ports = IbSysfsReader().read(root)
    assert [p.name for p in ports] == [f"mlx5_{i}/1" for i in range(8)]
    p = ports[0]
    assert (p.up, p.state, p.state_name, p.phys_state, p.phys_state_name, p.rate_gbps) == \
        (True, 4, "ACTIVE", 5, "LinkUp", 400.0)
    assert p.counters["link_downed"] == 0 and len(p.counters) == 12


def test_a_host_without_infiniband_has_no_ports_and_logs_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aidc.health"):
        assert IbSysfsReader().read(tmp_path) == []
    assert caplog.records == []


def test_missing_or_garbage_files_leave_only_their_value_out_and_are_logged_once(tmp_path, caplog):
    root = fake_sysfs(tmp_path / "sys", hcas=2)
    port = root / "class/infiniband/mlx5_1/ports/1"
    (port / "state").unlink()
    (port / "rate").write_text("fast\n")
    (port / "counters/symbol_error").write_bytes(b"\xff\xfe12\n")
    (port / "counters/port_rcv_errors").write_text("-3\n")
    reader = IbSysfsReader(node="n1")
    with caplog.at_level(logging.WARNING, logger="aidc.health"):
        for _ in range(3):
            ports = reader.read(root)
    bad = ports[1]
    assert (bad.state, bad.up, bad.rate_gbps) == (None, None, None)
    assert bad.phys_state == 5 and "symbol_error" not in bad.counters and "port_rcv_errors" not in bad.counters
    assert bad.counters["link_downed"] == 0
    assert ports[0].up is True and ports[0].rate_gbps == 400.0
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, "one line per bad file, not one per read"
    assert any("mlx5_1/ports/1/state is missing" in m for m in messages)
    assert any("rate holds 'fast'" in m for m in messages)


def test_flapping_counts_link_downs_within_the_window_only():
    flaps = FlapDetector(FabricThresholds("t", flap_downs=3, flap_window_s=60))
    assert flaps.observe("p", 5, now=0) == 0, "the first reading is the baseline, not 5 transitions"
    assert flaps.observe("p", 7, now=10) == 2 and not flaps.flapping(2)
    assert flaps.flapping(flaps.observe("p", 8, now=20))
    assert flaps.observe("p", 8, now=75) == 1, "the first two transitions left the window"
    assert flaps.observe("p", 0, now=80) == 1, "a counter reset is not a transition"
    assert flaps.watched_a_whole_window("p", now=80) and not flaps.watched_a_whole_window("q", now=80)
    flaps.observe("q", 0, now=70)
    assert not flaps.watched_a_whole_window("q", now=80), "a port read for 10 s of a 60 s window"


def test_the_shipped_thresholds_match_the_alert_rule_and_bad_ones_are_refused():
    t = load_thresholds()
    assert (t.flap_downs, t.flap_window_s) == (4, 900.0), "AidcInfinibandLinkFlapping: more than 3 in 15 minutes"
    with pytest.raises(SpecError, match="flapping"):
        FabricThresholds.parse({"version": "x", "flapping": {"link_downs": 0, "window_s": 60}}, "f.yaml")
    with pytest.raises(SpecError, match="flapping"):
        FabricThresholds.parse({"version": "x"}, "f.yaml")


def write_links(node_dir, **rails):
    (node_dir / sim.LINKS_FILE).write_text(json.dumps(
        {"rails": {str(r): {"up": up, "rate_fraction": 1.0, "loss_pct": 0.0} for r, up in rails.items()}}))


@pytest.fixture
def ib_node(tmp_path):
    return sim.create_node(tmp_path / "node-a", "node-a", gpus=1, rails=2, link_speed_gbps=200)


def active_conditions(run) -> dict:
    store = Store(run.store_path)
    try:
        return json.loads(store.get("health.conditions:node-a") or "{}")
    finally:
        store.close()


def ib_kinds(run):
    return [(e.kind, e.action) for e in run.events() if e.kind in (FaultKind.IB_PORT_DOWN, FaultKind.IB_LINK_FLAPPING)]


def test_a_simulated_rail_taken_down_in_links_json_is_a_port_down_fault_and_clears_when_up(ib_node, agent_run):
    port = free_port()
    with agent_run(ib_node, port=port) as run:
        page = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_ib_port_up", device="mlx5_1") == 1 and t)
        assert metric_value(page, "aidc_ib_port_rate_gbps", device="mlx5_1", port="1", Hostname="node-a") == 200.0
        write_links(ib_node, **{"1": False})
        page = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_ib_port_up", device="mlx5_1") == 0 and t)
        assert metric_value(page, "aidc_ib_link_downed_total", device="mlx5_1", port="1") == 1
        assert metric_value(page, "aidc_ib_port_up", device="mlx5_0") == 1, "the other rail is untouched"
        wait_for(lambda: ib_kinds(run) == [(FaultKind.IB_PORT_DOWN, Action.CONTACT_SUPPORT)])
        (event,) = [e for e in run.events() if e.kind == FaultKind.IB_PORT_DOWN]
        assert "mlx5_1/1" in event.message and event.source == "sysfs"
        write_links(ib_node, **{"1": True})
        wait_for(lambda: metric_value(scrape(port), "aidc_ib_port_up", device="mlx5_1") == 1)
        wait_for(lambda: "ib_port_down:mlx5_1/1" not in active_conditions(run))
    assert ib_kinds(run) == [(FaultKind.IB_PORT_DOWN, Action.CONTACT_SUPPORT)], "reported once, not per poll"


def test_a_rail_going_down_four_times_is_flapping(ib_node, agent_run):
    port = free_port()
    with agent_run(ib_node, port=port) as run:
        wait_for(lambda: metric_value(scrape(port), "aidc_ib_port_up", device="mlx5_0") == 1)
        for downs in range(1, 5):
            write_links(ib_node, **{"0": False})
            wait_for(lambda: metric_value(scrape(port), "aidc_ib_link_downed_total", device="mlx5_0") == downs)
            write_links(ib_node, **{"0": True})
            wait_for(lambda: metric_value(scrape(port), "aidc_ib_port_up", device="mlx5_0") == 1)
        wait_for(lambda: (FaultKind.IB_LINK_FLAPPING, Action.CONTACT_SUPPORT) in ib_kinds(run))
    flapping = [e for e in run.events() if e.kind == FaultKind.IB_LINK_FLAPPING]
    assert len(flapping) == 1 and "4 link-down transitions within 900 s" in flapping[0].message
    with agent_run(ib_node, port=port) as again:  # a restarted agent has not counted for a window yet
        wait_for(lambda: metric_value(scrape(port), "aidc_ib_link_downed_total", device="mlx5_0") == 4)
        # A later poll seen in the metrics: the polls before it were handled completely.
        (ib_node / sim.LINKS_FILE).write_text(json.dumps({"rails": {"1": {"up": True, "loss_pct": 1.0}}}))
        wait_for(lambda: (metric_value(scrape(port), "aidc_ib_port_rcv_errors_total", device="mlx5_1") or 0) > 1)
        assert "ib_link_flapping:mlx5_0/1" in active_conditions(again), "not cleared by the restart"
    assert len([e for e in again.events() if e.kind == FaultKind.IB_LINK_FLAPPING]) == 1, "nor reported again"


class FixtureSysfs(SimBackend):
    """The sim's GPUs with a sysfs root of the test's own (the injectable root)."""

    def __init__(self, node_dir, root):
        super().__init__(node_dir)
        self.root = root

    def sysfs_root(self) -> str:
        return str(self.root)


def test_garbage_in_sysfs_leaves_the_metric_out_and_the_agent_keeps_watching(sim_node, tmp_path, agent_run, caplog):
    root = fake_sysfs(tmp_path / "sys", hcas=1)
    (root / "class/infiniband/mlx5_0/ports/1/state").write_text("\x00\x00garbage")
    (root / "class/infiniband/mlx5_0/ports/1/counters/link_downed").unlink()
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="aidc.health"):
        with agent_run(sim_node, port=port, backend=FixtureSysfs(sim_node, root)) as run:
            page = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_ib_port_rate_gbps") == 400.0 and t)
            assert metric_value(page, "aidc_ib_port_up") is None and metric_value(page, "aidc_ib_link_downed_total") is None
            assert metric_value(page, "aidc_ib_symbol_error_total", device="mlx5_0") == 0
            sim.inject(sim_node, "xid", gpu=0, xid=13)  # the agent still detects GPU faults
            wait_for(lambda: [e for e in run.events() if e.xid == 13])
    state_lines = [r for r in caplog.records if "ports/1/state" in r.getMessage()]
    assert len(state_lines) == 1, "logged once, however many polls"


def test_a_simulated_nvlink_going_down_shows_in_its_error_counters(sim_node, agent_run):
    port = free_port()
    with agent_run(sim_node, port=port):
        wait_for(lambda: metric_value(scrape(port), "aidc_gpu_nvlink_down", gpu="0") == 0)
        assert metric_value(scrape(port), "aidc_gpu_nvlink_errors_total", gpu="0") is None, "no links, no counters"
        sim.inject(sim_node, "nvlink_down", gpu=0)
        page = wait_for(lambda: (t := scrape(port)) and metric_value(t, "aidc_gpu_nvlink_down", gpu="0") == 1 and t)
    assert metric_value(page, "aidc_gpu_nvlink_errors_total", gpu="0", link="0", error="recovery") == 1
    assert metric_value(page, "aidc_gpu_nvlink_errors_total", gpu="0", link="5", error="crc_flit") == 0
    assert metric_value(page, "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", gpu="0") == 1
