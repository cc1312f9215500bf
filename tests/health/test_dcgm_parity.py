"""dcgm-exporter parity: the agent's DCGM_FI_* series have the names, Prometheus types and
labels dcgm-exporter gives them, checked against a pinned copy of its default counters file
(tests/health/data/dcgm-exporter-default-counters.csv, source commit in its header); with
dcgm-exporter beside it the agent leaves dcgm-exporter's default series to it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from aidc.device import sim
from aidc.device.sim import SimBackend
from aidc.health.exporter import DCGM_EXPORTER_DEFAULTS, HealthMetrics, render

COUNTERS_FILE = Path(__file__).parent / "data" / "dcgm-exporter-default-counters.csv"
# The labels dcgm-exporter's metrics template puts on every GPU series (release 4.5.3-4.8.2,
# internal/pkg/rendermetrics/render_metrics.go: gpu, UUID, pci_bus_id, device, modelName and,
# unless --no-hostname, Hostname).
DCGM_EXPORTER_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"}
# Fields of the default file the agent does not export, and why (NVML alone does not give them).
NOT_FROM_NVML = {
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "DCGM sums its own NVLink throughput sampling; NVML has no total",
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS": "vGPU guests only",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "DCGM profiling (DCP) module, not NVML",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "DCGM profiling (DCP) module, not NVML",
    "DCGM_FI_PROF_DRAM_ACTIVE": "DCGM profiling (DCP) module, not NVML",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "DCGM profiling (DCP) module, not NVML",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "DCGM profiling (DCP) module, not NVML",
}
_LINE = re.compile(r"^(#\s*)?(DCGM_[A-Z0-9_]+)\s*,\s*(gauge|counter|label)\s*,")


def dcgm_counters() -> tuple[dict[str, str], set[str]]:
    """({field: type} of every line, commented-out ones included; the uncommented fields)."""
    types, enabled = {}, set()
    for line in COUNTERS_FILE.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            types[m.group(2)] = m.group(3)
            if not m.group(1):
                enabled.add(m.group(2))
    return types, enabled


def exposition(text: str) -> tuple[dict[str, str], dict[str, list[set[str]]]]:
    """The page as written: ({name: TYPE}, {series name: [label-name sets]})."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))
    labels: dict[str, list[set[str]]] = {}
    for name, body in re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\} ", text, flags=re.M):
        labels.setdefault(name, []).append(set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', body)))
    return types, labels


@pytest.fixture
def page(tmp_path):
    def make(**kw) -> str:
        node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=2)
        metrics = HealthMetrics("n1", "sim", **kw)
        dev = SimBackend(node_dir)
        for i in range(dev.gpu_count()):
            metrics.update_gpu(dev.telemetry(i))
        metrics.xid(0, None, 13)
        return render(metrics.registry).decode()

    return make


def test_the_pinned_file_is_dcgm_exporters_and_still_reads_as_expected():
    types, enabled = dcgm_counters()
    assert "691c92762eb551313c825f6efe4ceeee20982801" in COUNTERS_FILE.read_text().splitlines()[1]
    assert types["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"] == "counter" and "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL" not in enabled
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_XID_ERRORS"} <= enabled


def test_every_dcgm_series_has_dcgm_exporters_type(page):
    types, _ = dcgm_counters()
    exported, _ = exposition(page())
    shared = {name for name in exported if name in types}
    assert len(shared) >= 25, sorted(shared)
    assert {name: exported[name] for name in shared} == {name: types[name] for name in shared}
    for name in ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_RETIRED_SBE", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
                 "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"):
        assert exported[name] == "counter", name


def test_every_field_dcgm_exporter_exports_by_default_is_exported_unless_nvml_lacks_it(page):
    types, enabled = dcgm_counters()
    fields = {name for name in enabled if types[name] != "label"}
    exported, _ = exposition(page())
    assert fields - set(exported) == set(NOT_FROM_NVML)
    assert "DCGM_FI_DEV_CLOCKS_EVENT_REASONS" in exported and "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS" not in exported


def test_every_gpu_series_carries_exactly_dcgm_exporters_labels(page):
    _, labels = exposition(page())
    dcgm_series = {name: sets for name, sets in labels.items() if name.startswith("DCGM_FI_")}
    assert len(dcgm_series) >= 30
    for name, sets in dcgm_series.items():
        for found in sets:
            assert found == DCGM_EXPORTER_LABELS, (name, found)
    assert 'device="nvidia1"' in page() and 'modelName="Simulated GPU (aidc lab)"' in page()


def test_with_dcgm_exporter_present_its_default_series_are_left_to_it(page):
    types, enabled = dcgm_counters()
    alone, _ = exposition(page())
    assert DCGM_EXPORTER_DEFAULTS == {n for n in enabled if types[n] != "label"} & set(alone), \
        "the overlap the switch removes is what dcgm-exporter exports by default"
    beside, _ = exposition(page(dcgm_exporter_present=True))
    assert not DCGM_EXPORTER_DEFAULTS & set(beside)
    assert set(alone) - set(beside) == DCGM_EXPORTER_DEFAULTS
    assert {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_ROW_REMAP_PENDING", "aidc_xid_errors_total"} <= set(beside)


def test_a_field_the_gpu_does_not_support_is_absent_not_zero(tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    t = dataclasses.replace(SimBackend(node_dir).telemetry(0), unsupported=("energy_mj", "ecc_dbe_volatile"))
    metrics = HealthMetrics("n1", "sim")
    metrics.update_gpu(t)
    text = render(metrics.registry).decode()
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter" in text, "still registered"
    assert "\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{" not in text and "\nDCGM_FI_DEV_ECC_DBE_VOL_TOTAL{" not in text
    assert "\nDCGM_FI_DEV_ECC_SBE_VOL_TOTAL{" in text


@pytest.mark.slow
def test_real_prometheus_reads_the_agents_dcgm_series_with_dcgm_exporters_types_and_labels(tmp_path):
    """A real Prometheus scrapes `aidc agent run`: its metadata API shows each DCGM_FI_* metric
    with the counters file's type, and its series carry dcgm-exporter's labels."""
    import json
    import shutil
    import subprocess
    import urllib.parse
    import urllib.request

    import yaml

    from aidc.polling import stop_process_group
    from tests.health.conftest import free_port, wait_for
    from tests.health.test_cli import start_agent, stop_agent

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; `make system-deps`)")
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=2)
    agent_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "aidc-agent", "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]}]}))
    agent = start_agent(tmp_path, "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir),
                        "--port", str(agent_port))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
                            start_new_session=True)

    def api(path: str, **params) -> dict | list | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/{path}?"
                                        f"{urllib.parse.urlencode(params)}", timeout=2) as resp:
                return json.loads(resp.read())["data"]
        except OSError:
            return None

    try:
        types, _enabled = dcgm_counters()
        metadata = wait_for(lambda: (m := api("metadata")) and "DCGM_FI_DEV_PCIE_REPLAY_COUNTER" in m and m, 30)
        series = wait_for(lambda: api("series", **{"match[]": '{__name__=~"DCGM_FI_.*"}'}), 30)
    finally:
        stop_process_group(prom, timeout_s=10)
        stop_agent(agent)
    seen = {name: entries[0]["type"] for name, entries in metadata.items() if name in types}
    assert len(seen) >= 25 and seen == {name: types[name] for name in seen}
    assert seen["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] == "counter" and seen["DCGM_FI_DEV_GPU_UTIL"] == "gauge"
    for s in series:
        assert set(s) - {"__name__", "job", "instance"} == DCGM_EXPORTER_LABELS, s
