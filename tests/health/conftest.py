"""Fixtures for the health stage: a simulated node, free loopback ports, a running agent."""

from __future__ import annotations

import contextlib
import threading
import urllib.request

import pytest

from aidc import polling
from aidc.audit.log import AuditLog
from aidc.device.sim import SimBackend, create_node
from aidc.health.agent import run_agent
from aidc.polling import free_port  # noqa: F401  (used by the tests through this module)
from aidc.store import Store


def wait_for(predicate, timeout_s: float = 15.0, every_s: float = 0.02):
    """Poll until predicate() is truthy (returns it) or fail after timeout_s (bounded)."""
    return polling.wait_for(getattr(predicate, "__doc__", None) or repr(predicate), predicate, timeout_s, every_s,
                             error=AssertionError)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text format, matched by name and a label subset."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        # The parser names a counter's series `<name>_total` even where the page does not
        # (dcgm-exporter's DCGM_FI_DEV_ECC_SBE_VOL_TOTAL): match the page's name as well.
        bare = family.type == "counter" and family.name == name
        for sample in family.samples:
            if (sample.name == name or bare and sample.name == name + "_total") and \
                    all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


@pytest.fixture
def sim_node(tmp_path):
    return create_node(tmp_path / "node-a", "node-a", gpus=2)


class AgentRun:
    """run_agent on a thread, stopped and joined on exit, pass or fail."""

    def __init__(self, node_dir, store_path, audit_path, port=None, poll_interval_s=0.05, device_timeout_s=5.0,
                 backend=None, **agent_kw):
        # A generous device timeout: on a loaded test machine a slow call must not read as a hang.
        self.node_dir, self.store_path, self.audit_path = node_dir, store_path, audit_path
        self.port, self.poll, self.timeout = port, poll_interval_s, device_timeout_s
        self.backend, self.agent_kw = backend, agent_kw
        self.stop, self.ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.agent = None

    def _run(self):
        try:
            self.agent = run_agent("node-a", self.backend or SimBackend(self.node_dir), self.node_dir / "kern.log",
                                   self.store_path, self.audit_path, self.port, self.poll, self.stop,
                                   device_timeout_s=self.timeout, ready=self.ready, **self.agent_kw)
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
            self.ready.set()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(15), "agent did not start"
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "agent did not stop"
        if self.error and not exc[0]:
            raise self.error

    def events(self):
        store = Store(self.store_path)
        try:
            return [e for _, e, _ in store.events("node-a")]
        finally:
            store.close()


@pytest.fixture
def agent_run(tmp_path):
    def make(node_dir, **kw):
        return AgentRun(node_dir, tmp_path / "store.db", tmp_path / "audit.db", **kw)

    return make


@contextlib.contextmanager
def opened_audit(path):
    log = AuditLog(path)
    try:
        yield log
    finally:
        log.close()


def _build_fake_nvml(tmp_path_factory, *defines: str):
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (Debian package gcc) to build the libnvidia-ml test double")
    out = tmp_path_factory.mktemp("fake-nvml")
    src = Path(__file__).parent / "fake_nvml" / "fake_nvml.c"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", *defines, "-o", str(out / "libnvidia-ml.so.1"), str(src)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory):
    """libnvidia-ml.so.1 test double (tests/health/fake_nvml/fake_nvml.c), compiled once."""
    return _build_fake_nvml(tmp_path_factory)


@pytest.fixture(scope="session")
def fake_old_nvml_dir(tmp_path_factory):
    """The same double as a pre-R535 driver (no nvmlDeviceGetCurrentClocksEventReasons)."""
    return _build_fake_nvml(tmp_path_factory, "-DOLD_DRIVER")
