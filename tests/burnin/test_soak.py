"""Soak: hold GEMM load and record clocks, throttle reasons, temperature and power over time; a
GPU whose SM clock sags under sustained load is named."""

import pytest

from aidc.burnin.soak import judge_soak, soak
from aidc.device.sim import SimBackend, create_node, inject


def series(clocks, reasons=()):
    return [{"t": i * 0.1, "sm_clock_mhz": c, "temperature_c": 50.0, "power_w": 300.0,
             "throttle_reasons": list(reasons) if c < clocks[0] else []} for i, c in enumerate(clocks)]


def test_steady_clocks_pass():
    reasons, notes, failed = judge_soak({0: series([1980.0] * 8), 1: series([1980, 1965, 1980, 1970] * 2)}, 0.1)
    assert (reasons, failed) == ([], [])


def test_a_gpu_whose_clock_sags_in_the_second_half_is_named_with_its_figures_and_throttle_reasons():
    sagging = series([1980.0] * 4 + [1100.0] * 4, ["hw_thermal_slowdown"])
    reasons, notes, failed = judge_soak({0: series([1980.0] * 8), 3: sagging}, 0.1)
    assert failed == [3] and len(reasons) == 1
    assert "GPU 3" in reasons[0] and "1980 MHz" in reasons[0] and "1100 MHz" in reasons[0]
    assert "hw_thermal_slowdown" in reasons[0]


def test_a_sag_within_the_tolerance_passes():
    assert judge_soak({0: series([1980.0] * 4 + [1900.0] * 4)}, 0.1)[2] == []


def test_a_gpu_throttled_from_the_start_has_no_sag_but_its_throttle_reasons_are_noted():
    steady = [dict(s, throttle_reasons=["sw_power_cap"]) for s in series([1100.0] * 8)]
    reasons, notes, failed = judge_soak({2: steady}, 0.1)
    assert (reasons, failed) == ([], []) and "sw_power_cap" in notes[0] and "GPU 2" in notes[0]


def test_too_few_samples_is_a_note_not_a_verdict():
    reasons, notes, failed = judge_soak({0: series([1980.0, 900.0])}, 0.1)
    assert (reasons, failed) == ([], []) and notes


def test_soak_on_simulated_gpus_records_telemetry_and_catches_a_gpu_throttling_under_load(tmp_path):
    node = create_node(tmp_path / "n", "n", 2)
    calls = {0: 0, 1: 0}

    def load(index):
        def step():
            calls[index] += 1
            if index == 1 and calls[1] == 3:  # GPU 1 heats up under the load
                inject(node, "thermal", gpu=1)
        return step

    dev = SimBackend(node)
    try:
        recorded = soak(dev, {0: load(0), 1: load(1)}, seconds=0.4, samples=8)
    finally:
        dev.close()
    assert set(recorded) == {0, 1} and all(len(s) == 8 for s in recorded.values())
    assert {s["sm_clock_mhz"] for s in recorded[0]} == {1980.0}
    assert recorded[1][0]["sm_clock_mhz"] == 1980.0 and recorded[1][-1]["sm_clock_mhz"] == 1100.0
    assert set(recorded[1][-1]) >= {"t", "sm_clock_mhz", "temperature_c", "power_w", "throttle_reasons"}
    assert calls[0] >= 8 and calls[1] >= 8  # load was held between every two samples
    assert judge_soak(recorded, 0.1)[2] == [1]


@pytest.mark.parametrize("seconds,samples", [(0, 8), (-1, 8), (1, 1)])
def test_soak_refuses_a_duration_or_sample_count_that_measures_nothing(tmp_path, seconds, samples):
    dev = SimBackend(create_node(tmp_path / "n", "n", 1))
    with pytest.raises(ValueError):
        soak(dev, {0: lambda: None}, seconds=seconds, samples=samples)


def test_the_node_program_soaks_every_gpu_with_its_gemm_and_records_the_driver_figures(tmp_path):
    from aidc.burnin.worker import NodeBenches

    node = create_node(tmp_path / "n", "n", 2)
    inject(node, "thermal", gpu=0)
    benches = NodeBenches({"backend": "sim", "backend_kwargs": {"node_dir": str(node)}, "device_timeout_s": 5.0,
                           "gemm_size": 16, "target_sample_s": 0.0, "memcpy_bytes": 1 << 16})
    benches.setup()
    calls = [g["fp32"].step.calls for g in benches.gpus]
    benches.soak_all(0.2)
    assert benches.errors == [] and benches.soak["samples"] == 8
    series = benches.soak["series"]
    assert {s["sm_clock_mhz"] for s in series["0"]} == {1100.0} and {s["sm_clock_mhz"] for s in series["1"]} == {1980.0}
    assert "hw_thermal_slowdown" in series["0"][-1]["throttle_reasons"]
    assert all(g["fp32"].step.calls >= c + 8 for g, c in zip(benches.gpus, calls))  # the load was the GEMM
