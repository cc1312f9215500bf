"""`aidc health check`: Slurm's HealthCheckProgram. Exit 0 healthy, 1 unhealthy with one reason
line, 2 bad usage; read-only; and light enough to run every interval (no torch on its path).

A node is unhealthy exactly when a finding's catalog action is in the spec's
policy.out_of_service_actions: the rule the failover controller applies to the same faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from aidc.device.sim import SimBackend, create_node, inject
from aidc.health.catalog import load_catalog
from aidc.health.check import check_node, line_time

OUT_OF_SERVICE = {"reset_gpu", "reboot_node", "contact_support"}


@pytest.fixture
def node(tmp_path):
    return create_node(tmp_path / "gpu-1", "gpu-1", gpus=2, node_index=1)


def check(aidc_cli, node_dir, *extra):
    return aidc_cli("health", "check", "--node", "gpu-1", "--backend", "sim", "--node-dir", str(node_dir), *extra,
                    timeout=60)


def test_a_healthy_node_exits_0(aidc_cli, node):
    proc = check(aidc_cli, node, "--stack", "lab")
    assert (proc.returncode, proc.stdout.strip()) == (0, "gpu-1: healthy"), proc.stderr


def test_a_gpu_fallen_off_the_bus_exits_1_with_the_reason(aidc_cli, node):
    inject(node, "xid", 0, xid=79)
    proc = check(aidc_cli, node, "--stack", "lab", "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["healthy"] is False and result["reason"].startswith("GPU 0 lost")
    assert {f["action"] for f in result["findings"]} == {"reboot_node"}
    assert result["kernel_faults_in_window"] == 1  # the XID 79 line, besides the lost GPU itself


def test_a_fault_whose_action_keeps_the_node_in_service_leaves_it_healthy(aidc_cli, node):
    inject(node, "xid", 1, xid=13)  # restart_app: the application's problem, not the node's
    proc = check(aidc_cli, node, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [finding] = json.loads(proc.stdout)["findings"]
    assert finding["action"] == "restart_app" and finding["out_of_service"] is False


def test_a_pending_row_remap_is_unhealthy(node):
    inject(node, "ecc_dbe", 1)
    result = check_node("gpu-1", SimBackend(node), catalog=load_catalog(), out_of_service=OUT_OF_SERVICE,
                        kernel_log=None, since_s=600)
    assert not result.healthy
    assert {(f.action, "row remap pending" in f.what) for f in result.findings} >= {("reset_gpu", True)}


def test_kernel_log_faults_older_than_the_window_do_not_count(node):
    with open(node / "kern.log", "a") as log:
        log.write("[   12.000000] NVRM: Xid (PCI:0000:19:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n")
    catalog = load_catalog()
    old = check_node("gpu-1", SimBackend(node), catalog=catalog, out_of_service=OUT_OF_SERVICE,
                     kernel_log=node / "kern.log", since_s=600, boot_time=time.time() - 3600)
    recent = check_node("gpu-1", SimBackend(node), catalog=catalog, out_of_service=OUT_OF_SERVICE,
                        kernel_log=node / "kern.log", since_s=600, boot_time=time.time() - 60)
    assert old.healthy and old.kernel_faults_in_window == 0
    assert not recent.healthy and recent.reason.startswith("XID 79 on 0000:19:00.0")


def test_the_spec_decides_which_actions_take_a_node_out(node):
    inject(node, "ecc_dbe", 0)  # reset_gpu
    lenient = check_node("gpu-1", SimBackend(node), catalog=load_catalog(), out_of_service={"reboot_node"},
                         kernel_log=node / "kern.log", since_s=600)
    assert lenient.healthy and lenient.findings


def test_a_hung_device_layer_is_unhealthy_without_waiting_for_the_driver(aidc_cli, node):
    inject(node, "hang", seconds=120)
    proc = check(aidc_cli, node, "--device-timeout", "0.2")  # bounded by the test's timeout, not the hang
    assert proc.returncode == 1
    assert proc.stdout.startswith("gpu-1: unhealthy: device layer hung")


def test_fewer_gpus_than_expected_is_unhealthy(aidc_cli, node):
    proc = check(aidc_cli, node, "--gpus", "3", "--no-kernel-log")
    assert (proc.returncode, proc.stdout.strip()) == (1, "gpu-1: unhealthy: 2 of 3 GPUs visible")


def _driver_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(_driver_present(), reason="an NVIDIA driver answers on this machine")
def test_no_driver_is_unhealthy_not_a_usage_error(aidc_cli):
    proc = aidc_cli("health", "check", "--node", "gpu-1", "--backend", "nvml", "--no-kernel-log",
                    env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "", **_pythonpath()})
    assert proc.returncode == 1 and "device layer unavailable" in proc.stdout


def _pythonpath() -> dict:
    import os

    return {"PYTHONPATH": os.environ["PYTHONPATH"]}


@pytest.mark.parametrize("args, says", [
    (("--backend", "sim"), "--node-dir"),
    (("--backend", "sim", "--node-dir", "NODE", "--kernel-log", "/nonexistent/kern.log"),
     "aidc: error: kernel log /nonexistent/kern.log: no such file"),
    (("--stack", "lab", "--node", "gpu-9"), "'gpu-9' is not a node of cluster lab"),
    (("--backend", "cuda"), "'cuda'; valid: nvml, sim"),
])
def test_bad_usage_exits_2_with_the_reason(aidc_cli, node, args, says):
    args = tuple(str(node) if a == "NODE" else a for a in args)
    proc = aidc_cli("health", "check", *(("--node", "gpu-1") if "--node" not in args else ()), *args)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


def test_the_check_path_does_not_import_torch_or_other_heavy_modules(node):
    code = ("import sys\nfrom aidc.cli.main import main\n"
            f"sys.argv = ['aidc', 'health', 'check', '--node', 'gpu-1', '--backend', 'sim', '--node-dir', {str(node)!r},"
            " '--stack', 'lab']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'pulumi', 'ansible', 'ansible_runner', 'prometheus_client')"
            " if m in sys.modules)\nprint(code, heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr


@pytest.mark.parametrize("line, expected", [
    ("[  100.500000] NVRM: Xid", 1000.0 + 100.5),
    ("6,1234,2000000,-;NVRM: Xid", 1000.0 + 2.0),
    ("2024-08-30T11:43:14+02:00 host kernel: NVRM: Xid", 1725010994.0),
    ("2024-08-30T09:43:14Z host kernel: NVRM: Xid", 1725010994.0),
    ("NVRM: Xid (PCI:0000:18:00): 79", None),
])
def test_line_times_from_each_prefix(line, expected):
    assert line_time(line, boot_time=1000.0, now=1725011000.0) == expected


def test_local_wall_clock_prefixes_read_back_to_the_same_time():
    now = time.time()
    written = int(now) - 120
    dmesg_t = time.strftime("[%a %b %d %H:%M:%S %Y] NVRM: Xid", time.localtime(written))
    syslog = time.strftime("%b %d %H:%M:%S gpu-1 kernel: NVRM: Xid", time.localtime(written))
    assert line_time(dmesg_t, 0.0, now) == written
    assert line_time(syslog, 0.0, now) == written
