"""The agent's metrics server binds where it is told: loopback by default, all addresses in a pod."""

from __future__ import annotations

from aidc.device import sim
from tests.health.conftest import free_port, wait_for
from tests.health.test_cli import _scrape_or_none, start_agent, stop_agent


def listening_on(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    out = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            out.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


def test_by_default_the_metrics_server_listens_on_loopback_only(tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    port = free_port()
    proc = start_agent(tmp_path, "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir), "--port", str(port))
    try:
        wait_for(lambda: _scrape_or_none(port) is not None)
        assert listening_on(port) == {"127.0.0.1"}
    finally:
        assert stop_agent(proc)[0] == 0


def test_listen_address_all_makes_it_scrapeable_on_the_pod_ip(tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    port = free_port()
    proc = start_agent(tmp_path, "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir), "--port", str(port),
                       "--listen-address", "0.0.0.0")
    try:
        wait_for(lambda: _scrape_or_none(port) is not None)
        assert listening_on(port) == {"0.0.0.0"}
    finally:
        code, _, err = stop_agent(proc)
    assert code == 0, err


def test_a_listen_address_that_is_not_an_ip_is_a_usage_error(aidc_cli, tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    r = aidc_cli("agent", "run", "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir),
                 "--store", str(tmp_path / "s.db"), "--audit-db", str(tmp_path / "a.db"),
                 "--listen-address", "0.0.0.0; curl evil")
    assert r.returncode == 2 and "--listen-address" in r.stderr
    assert not (tmp_path / "s.db").exists()
