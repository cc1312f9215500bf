"""`aidc health parse-log` and `aidc agent run` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from aidc.device import sim
from aidc.events import Action, FaultKind
from aidc.store import Store

from tests.health.conftest import free_port, metric_value, scrape, wait_for

MIXED = Path(__file__).parent / "data" / "mixed-sources.log"


def test_parse_log_json_prints_one_object_per_event_with_xid_pci_action_line(aidc_cli):
    r = aidc_cli("health", "parse-log", str(MIXED), "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    got = [(e["xid"], e["pci"], e["action"]) for e in events]
    assert got == [
        (13, "0000:17:00.0", "restart_app"), (43, "0000:17:00.0", "ignore"), (48, "0000:27:00.0", "reset_gpu"),
        (79, "0000:37:00.0", "reboot_node"), (94, "0000:47:00.0", "restart_app"), (109, "0000:57:00.0", "reset_gpu"),
        (154, "0000:67:00.0", "reset_gpu"), (None, "0000:77:00.0", "reboot_node"),
        (4242, "0000:87:00.0", "contact_support"),
    ]
    assert events[7]["kind"] == "fallen_off_bus" and "fallen off the bus" in events[7]["line"]
    source_lines = MIXED.read_text().splitlines()
    assert all(e["line"] in source_lines for e in events if e["kind"] == "xid")


def test_parse_log_text_is_a_table_naming_the_catalog_version(aidc_cli):
    r = aidc_cli("health", "parse-log", str(MIXED))
    assert r.returncode == 0
    assert "reboot_node" in r.stdout and "9 fault(s); catalog " in r.stdout


def test_parse_log_on_a_missing_file_exits_2_with_a_clear_message(aidc_cli, tmp_path):
    r = aidc_cli("health", "parse-log", str(tmp_path / "absent.log"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"aidc: error: {tmp_path / 'absent.log'}: no such file"
    as_json = aidc_cli("health", "parse-log", str(tmp_path / "absent.log"), "--json")
    assert as_json.returncode == 2 and as_json.stdout == ""
    assert json.loads(as_json.stderr) == {"error": f"{tmp_path / 'absent.log'}: no such file", "exit_code": 2}


def test_parse_log_of_a_log_without_gpu_faults_prints_nothing_in_json(aidc_cli, tmp_path):
    quiet = tmp_path / "quiet.log"
    quiet.write_text("[ 1.0] usb 1-1: new high-speed USB device\n")
    r = aidc_cli("health", "parse-log", str(quiet), "--json")
    assert (r.returncode, r.stdout) == (0, "")


def test_parse_log_reads_through_any_bytes_skips_what_it_cannot_read_and_reports_the_real_fault(aidc_cli, tmp_path):
    hostile = tmp_path / "hostile.log"
    hostile.write_bytes(b"\n".join([
        b"[ 1.0] \xff\xfe invalid UTF-8 \xc3\x28 and NULs \x00\x00\x00",
        b"[ 1.1] NVRM: Xid (PCI:0000:17:00): " + b"9" * 5000 + b", pid=1",            # unreadable: number
        b"[ 1.2] nvidia-nvswitch0: SXid (PCI:::): 12028, Fatal, Link 32",             # unreadable: PCI id
        b"[ 1.3] usb 1-1: Product: NVRM: Xid (PCI:0000:17:00): 79, a USB stick",     # not the driver's line
        b"Aug 30 11:43:14 gpu-node-7 alice: NVRM: Xid (PCI:0000:17:00): 79, logger",  # not the kernel's
        "[ 1.4] NVRM: Xid (PCI:0000:17:00): \uff17\uff19, full-width".encode(),      # unreadable: digits
        b"[ 1.5] " + b"x" * (3 << 20),                                                # 3 MiB line
        b"[ 1.6] NVRM: Xid (PCI:0000:27:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    ]) + b"\n")
    r = aidc_cli("health", "parse-log", str(hostile), "--json")
    assert r.returncode == 0, r.stderr
    (event,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert (event["xid"], event["pci"], event["action"], event["line_number"]) == (79, "0000:27:00.0", "reboot_node", 8)
    warnings = r.stderr.splitlines()
    assert [w.split(":")[3] for w in warnings] == ["2", "3", "6"], r.stderr
    assert all(w.startswith(f"aidc: warning: {hostile}:") for w in warnings)


def test_health_and_agent_commands_have_help(aidc_cli):
    for args in (("health", "--help"), ("health", "parse-log", "--help"), ("agent", "run", "--help"),
                 ("health", "catalog", "--json")):
        assert aidc_cli(*args).returncode == 0


def start_agent(tmp_path, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "aidc", "agent", "run", "--store", str(tmp_path / "store.db"),
                             "--audit-db", str(tmp_path / "audit.db"), "--poll-interval", "0.05", "--device-timeout", "5", "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop_agent(proc) -> tuple[int, str, str]:
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_agent_process_on_a_sim_node_reports_a_fault_and_stops_cleanly_on_sigterm(tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=2)
    port = free_port()
    proc = start_agent(tmp_path, "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir), "--port", str(port))
    try:
        wait_for(lambda: _scrape_or_none(port) is not None)
        sim.inject(node_dir, "xid", gpu=0, xid=79)
        store = Store(tmp_path / "store.db")
        (event,) = wait_for(lambda: [e for _, e, _ in store.events("n1") if e.xid == 79])
        store.close()
    finally:
        code, out, err = stop_agent(proc)
    assert code == 0, err
    assert (event.action, event.gpu) == (Action.REBOOT_NODE, 0)
    summary = json.loads(out)
    assert summary["node"] == "n1" and summary["events_emitted"] >= 1
    assert "fallen_off_bus:0" in summary["active_conditions"]


def test_agent_process_on_the_nvml_backend_turns_telemetry_into_faults(tmp_path, fake_nvml_dir):
    port, kern = free_port(), tmp_path / "kern.log"
    kern.touch()
    env = dict(os.environ, LD_LIBRARY_PATH=str(fake_nvml_dir))
    proc = start_agent(tmp_path, "--node", "g1", "--backend", "nvml", "--kernel-log", str(kern), "--port", str(port),
                       env=env)
    want = {FaultKind.ECC_DBE, FaultKind.ROW_REMAP_PENDING, FaultKind.NVLINK_DOWN, FaultKind.PCIE_DEGRADED,
            FaultKind.THERMAL_THROTTLE, FaultKind.XID}
    try:
        store = Store(tmp_path / "store.db")
        events = wait_for(lambda: (ev := [e for _, e, _ in store.events("g1")]) and {e.kind for e in ev} >= want and ev)
        store.close()
        text = scrape(port)
    finally:
        code, _, err = stop_agent(proc)
    assert code == 0, err
    assert len(events) == len(want), [e.message for e in events]
    assert all(e.gpu == 0 for e in events if e.kind != FaultKind.XID), "GPU 1 is idle at Gen5x16: healthy"
    assert [(e.gpu, e.xid) for e in events if e.kind == FaultKind.XID] == [(1, 79)]
    assert metric_value(text, "DCGM_FI_DEV_POWER_USAGE", gpu="0") == 612.25
    assert metric_value(text, "DCGM_FI_DEV_PCIE_LINK_GEN", gpu="0") == 4.0
    assert metric_value(text, "aidc_gpu_nvlink_down", gpu="0") == 1.0
    assert metric_value(text, "aidc_gpu_power_throttled", gpu="0") == 1.0
    assert metric_value(text, "aidc_agent_info", backend="nvml") == 1.0


def _scrape_or_none(port):
    try:
        return scrape(port)
    except OSError:
        return None


def test_agent_with_its_metrics_port_taken_exits_2_with_a_clear_message(tmp_path, aidc_cli):
    import socket

    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = aidc_cli("agent", "run", "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir),
                     "--store", str(tmp_path / "s.db"), "--audit-db", str(tmp_path / "a.db"), "--port", str(port),
                     timeout=60)
    assert r.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_agent_sim_backend_without_node_dir_is_a_clear_error(tmp_path, aidc_cli):
    r = aidc_cli("agent", "run", "--node", "n1", "--backend", "sim", "--store", str(tmp_path / "s.db"),
                 "--audit-db", str(tmp_path / "a.db"))
    assert r.returncode == 2 and "needs --node-dir" in r.stderr


def test_health_events_lists_what_the_agent_stored(tmp_path, aidc_cli):
    from aidc.events import FaultEvent

    store = Store(tmp_path / "s.db")
    store.append(FaultEvent("n1", FaultKind.XID, Action.REBOOT_NODE, "XID 79 on 0000:17:00.0", "kmsg", gpu=0,
                            pci="0000:17:00.0", xid=79))
    store.close()
    r = aidc_cli("health", "events", "--store", str(tmp_path / "s.db"), "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert (row["node"], row["xid"], row["action"], row["outcome"]) == ("n1", 79, "reboot_node", None)
    assert aidc_cli("health", "events", "--store", str(tmp_path / "none.db")).returncode == 2
