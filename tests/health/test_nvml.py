"""The nvml backend. Without a GPU here, nvidia-ml-py's real ctypes code paths run against a
test double of libnvidia-ml.so.1 (tests/health/fake_nvml/fake_nvml.c, compiled per session);
the no-driver path runs against the real absence of the library."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from aidc.device.nvml import decode_clock_event_reasons, encode_clock_event_reasons

def test_clock_event_bitmask_decodes_to_names_and_back():
    assert decode_clock_event_reasons(0) == ()
    assert decode_clock_event_reasons(0x60) == ("sw_thermal_slowdown", "hw_thermal_slowdown")
    assert decode_clock_event_reasons(0x1 | 0x4 | 0x80) == ("gpu_idle", "sw_power_cap", "hw_power_brake_slowdown")
    assert decode_clock_event_reasons(1 << 40) == ("bit_40",), "an unknown bit is named, never dropped"
    for mask in (0, 0x1FF, 0x48, (1 << 40) | 0x2):
        assert encode_clock_event_reasons(decode_clock_event_reasons(mask)) == mask


def test_decoding_matches_pynvml_constants():
    import pynvml

    assert decode_clock_event_reasons(pynvml.nvmlClocksEventReasonHwThermalSlowdown) == ("hw_thermal_slowdown",)
    assert decode_clock_event_reasons(pynvml.nvmlClocksEventReasonSwPowerCap) == ("sw_power_cap",)
    assert len(decode_clock_event_reasons(pynvml.nvmlClocksEventReasonAll)) == 9


def test_without_the_nvml_library_the_backend_says_no_nvidia_driver(monkeypatch):
    import pynvml

    from aidc.device.nvml import NvmlBackend
    from aidc.errors import NoDriverError

    def no_library(name, *a, **kw):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", no_library)  # nvmlInit's own loader path runs and fails
    with pytest.raises(NoDriverError, match="^no NVIDIA driver: "):
        NvmlBackend()


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="an NVIDIA driver is installed here")
def test_cli_without_a_driver_prints_one_plain_line_and_exits_2(aidc_cli):
    r = aidc_cli("device", "show", "--backend", "nvml")
    assert r.returncode == 2
    assert r.stderr.startswith("aidc: error: no NVIDIA driver") and "Traceback" not in r.stderr


def with_fake_nvml(fake_dir, code: str, **env) -> subprocess.CompletedProcess:
    """Run Python in a subprocess whose dynamic loader finds the test double first."""
    full = dict(os.environ, LD_LIBRARY_PATH=str(fake_dir), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60)


READ_ALL = """
import json, dataclasses
from aidc.device import TimedBackend
from aidc.device.nvml import NvmlBackend
dev = TimedBackend(NvmlBackend(), 5.0)
out = {"count": dev.gpu_count(), "gpus": [dataclasses.asdict(dev.telemetry(i)) for i in range(dev.gpu_count())],
       "xids": [dataclasses.asdict(x) for x in dev.xid_events(50)], "again": len(dev.xid_events(0)),
       "torch": dev.torch_device(1)}
dev.close()
print(json.dumps(out))
"""


def test_every_telemetry_field_is_read_through_pynvml(fake_nvml_dir):
    r = with_fake_nvml(fake_nvml_dir, READ_ALL)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    g0 = out["gpus"][0]
    assert out["count"] == 2 and out["torch"] == "cuda:1"
    assert (g0["uuid"], g0["pci_bus_id"], g0["name"]) == ("GPU-fake-0000", "00000000:17:00.0", "Fake H100 80GB HBM3")
    assert (g0["temperature_c"], g0["power_w"], g0["sm_clock_mhz"], g0["mem_clock_mhz"]) == (87.0, 612.25, 1755.0, 2619.0)
    assert g0["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert (g0["ecc_sbe_volatile"], g0["ecc_dbe_volatile"], g0["ecc_sbe_aggregate"], g0["ecc_dbe_aggregate"]) == \
        (7, 1, 107, 101)
    assert (g0["retired_pages_sbe"], g0["retired_pages_dbe"], g0["retired_pages_pending"]) == (2, 1, False)
    assert (g0["row_remap_correctable"], g0["row_remap_uncorrectable"], g0["row_remap_pending"],
            g0["row_remap_failure"]) == (3, 1, True, False)
    assert (g0["pcie_gen"], g0["pcie_gen_max"], g0["pcie_width"], g0["pcie_width_max"]) == (4, 5, 16, 16)
    assert g0["nvlink_up"] == [True, False, True]
    assert g0["unsupported"] == []


def test_nvlink_error_counters_are_read_per_link_through_pynvml(fake_nvml_dir):
    g0 = json.loads(with_fake_nvml(fake_nvml_dir, READ_ALL).stdout)["gpus"][0]
    counters = {(link, name): n for link, name, n in g0["nvlink_errors"]}
    assert len(counters) == 3 * 4, "four counters on each of the three links"
    assert counters[(1, "crc_flit")] == 42 and counters[(2, "replay")] == 2 and counters[(0, "crc_data")] == 1


def test_dcgm_exporter_staples_are_read_through_pynvml(fake_nvml_dir):
    g0, g1 = json.loads(with_fake_nvml(fake_nvml_dir, READ_ALL).stdout)["gpus"]
    assert (g0["gpu_util_pct"], g0["mem_copy_util_pct"], g0["enc_util_pct"], g0["dec_util_pct"]) == (97, 41, 3, 5)
    assert (g0["fb_used_mib"], g0["fb_reserved_mib"], g0["fb_free_mib"]) == (1024, 512, 81920 - 1536)
    assert (g0["energy_mj"], g0["pcie_replay"], g0["memory_temp_c"]) == (123456789, 2, 71.0)
    assert g1["fb_free_mib"] == 81920 and g1["nvlink_errors"] == []


def test_fields_the_gpu_does_not_support_are_named_not_zeroed_silently(fake_nvml_dir):
    out = json.loads(with_fake_nvml(fake_nvml_dir, READ_ALL).stdout)
    g1 = out["gpus"][1]
    assert set(g1["unsupported"]) == {
        "ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate", "retired_pages_sbe",
        "retired_pages_dbe", "retired_pages_pending", "row_remap_correctable", "row_remap_uncorrectable",
        "row_remap_pending", "row_remap_failure", "nvlink_up", "energy_mj", "enc_util_pct", "dec_util_pct",
        "memory_temp_c"}
    assert g1["throttle_reasons"] == ["gpu_idle"] and g1["temperature_c"] == 45.0


def test_xid_events_come_from_the_nvml_event_set_once(fake_nvml_dir):
    out = json.loads(with_fake_nvml(fake_nvml_dir, READ_ALL).stdout)
    assert [(x["gpu"], x["pci_bus_id"], x["xid"]) for x in out["xids"]] == [(1, "00000000:27:00.0", 79)]
    assert out["again"] == 0


def test_a_lost_gpu_is_a_device_error_saying_it_fell_off_the_bus(fake_nvml_dir):
    code = ("from aidc.device.nvml import NvmlBackend\nfrom aidc.errors import DeviceError\nb = NvmlBackend()\n"
            "b.telemetry(0)\ntry:\n    b.telemetry(1)\nexcept DeviceError as e:\n    print(e)\n")
    r = with_fake_nvml(fake_nvml_dir, code, FAKE_NVML_LOST="1")
    assert r.returncode == 0, r.stderr
    assert "GPU 1" in r.stdout and "fallen off the bus" in r.stdout


POLL_ONCE = """
import json
from aidc.device import TimedBackend
from aidc.device.nvml import NvmlBackend
from aidc.health.agent import poll_device
obs = poll_device(TimedBackend(NvmlBackend(), 5.0))
print(json.dumps({"xids": [(x.gpu, x.xid) for x in obs.xids], "errors": obs.errors,
                  "lost": sorted(obs.lost), "read": sorted(obs.telemetry)}))
"""


def test_a_gpu_lost_at_start_does_not_stop_the_other_gpus_xid_events(fake_nvml_dir):
    # GPU 0 is lost; the double queues its XID 79 on GPU 1 only if GPU 1 got registered.
    r = with_fake_nvml(fake_nvml_dir, POLL_ONCE, FAKE_NVML_LOST="0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"xids": [[1, 79]], "errors": [], "lost": [0], "read": [1]}


LOST_THEN_BACK = """
import json, os
from aidc.device.nvml import NvmlBackend
def run(retry_s):
    os.environ["FAKE_NVML_LOST"] = "1"  # the double reads it on every call
    b = NvmlBackend()
    b.XID_RETRY_S = retry_s
    first = b.xid_events(0)
    del os.environ["FAKE_NVML_LOST"]    # GPU 1 answers again (e.g. after a reset)
    second = b.xid_events(0)
    return [[(x.gpu, x.xid) for x in first], [(x.gpu, x.xid) for x in second]]
print(json.dumps({"not_yet_due": run(60.0), "due": run(0.0)}))
"""


def test_a_gpu_that_could_not_be_registered_for_xid_events_is_tried_again_after_a_while(fake_nvml_dir):
    r = with_fake_nvml(fake_nvml_dir, LOST_THEN_BACK)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["not_yet_due"] == [[], []], "bounded: not retried on every call"
    assert out["due"] == [[], [[1, 79]]]


def test_a_wedged_nvml_call_becomes_device_hang_through_the_timed_backend(fake_nvml_dir):
    code = ("from aidc.device import TimedBackend\nfrom aidc.device.nvml import NvmlBackend\n"
            "from aidc.errors import DeviceHang\nimport os\nb = TimedBackend(NvmlBackend(), 0.2)\n"
            "try:\n    b.telemetry(0)\nexcept DeviceHang as e:\n    print('HANG', e, b.hung_calls)\n"
            "    os._exit(0)\nprint('NO HANG')\n")
    r = with_fake_nvml(fake_nvml_dir, code, FAKE_NVML_HANG_MS="3000")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("HANG nvml: telemetry(gpu 0) did not return") and r.stdout.strip().endswith(" 1")


def test_an_older_driver_without_clocks_event_reasons_uses_the_throttle_reasons_call(fake_old_nvml_dir):
    r = with_fake_nvml(fake_old_nvml_dir, READ_ALL)
    assert r.returncode == 0, r.stderr
    g0 = json.loads(r.stdout)["gpus"][0]
    assert g0["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"] and g0["unsupported"] == []
