"""The transport as it runs on a cluster: `aidc failover run --listen` and `aidc agent run
--controller-url` as processes, each with its own store, killed and restarted.

Specification: a fault injected on the node is quarantined by the controller; with the
controller killed (SIGKILL), the agent keeps what it detects and delivers it when the
controller is back; an agent killed before it could forward sends after its restart; every
event is stored once at the controller, and the node is quarantined once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from aidc import polling
from aidc.audit.log import AuditLog
from aidc.device.sim import create_node, inject
from tests.transport.transport_helpers import NODES, ROOT_AGENTS, wait_for

pytestmark = pytest.mark.slow


def start(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aidc", *args], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": ROOT_AGENTS}, start_new_session=True)


def events(db: Path) -> list[tuple[str, str | None]]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT key, outcome FROM events WHERE node = 'gpu-1' ORDER BY id").fetchall()


def test_faults_reach_a_restarted_controller_from_a_restarted_agent_once(pki, tmp_path):
    lab = tmp_path / "lab"
    for i, name in enumerate(NODES):
        create_node(lab / "nodes" / name, name, gpus=2, node_index=i)
    node_dir, agent_db, port = lab / "nodes" / "gpu-1", tmp_path / "agent" / "store.db", polling.free_port()
    controller_args = ["failover", "run", "--stack", "lab", "--lab-dir", str(lab), "--no-dry-run",
                       "--listen", f"127.0.0.1:{port}", "--tls-cert", str(pki["server"].cert),
                       "--tls-key", str(pki["server"].key), "--client-ca", str(pki["ca"].cert_file)]
    agent_args = ["agent", "run", "--node", "gpu-1", "--backend", "sim", "--node-dir", str(node_dir),
                  "--store", str(agent_db), "--audit-db", str(tmp_path / "agent" / "audit.db"), "--port", "0",
                  "--poll-interval", "0.05", "--controller-url", f"https://127.0.0.1:{port}",
                  "--tls-cert", str(pki["gpu-1"].cert), "--tls-key", str(pki["gpu-1"].key),
                  "--ca", str(pki["ca"].cert_file)]
    clog, alog = tmp_path / "controller.log", tmp_path / "agent.log"
    procs = [start(controller_args, clog), start(agent_args, alog)]
    try:
        wait_for("the listener", lambda: "receiving fault events" in clog.read_text(), 120)
        wait_for("the agent", lambda: "watching gpu-1" in alog.read_text(), 60)
        inject(node_dir, "xid", 0, xid=79)
        wait_for("the quarantine recorded", lambda: [o for _, o in events(lab / "state.db")] == ["quarantine"], 120)
        assert (node_dir / "quarantined").exists()

        os.killpg(procs[0].pid, signal.SIGKILL)  # the controller dies
        procs[0].wait(10)
        inject(node_dir, "xid", 1, xid=109)
        wait_for("the agent to record it", lambda: len(events(agent_db)) == 2, 120)
        os.killpg(procs[1].pid, signal.SIGKILL)  # and the agent, before it could forward
        procs[1].wait(10)
        inject(node_dir, "xid", 1, xid=95)  # written while no agent runs: read after its restart

        procs += [start(agent_args, alog)]
        wait_for("the restarted agent to record it", lambda: len(events(agent_db)) == 3, 120)
        assert len(events(lab / "state.db")) == 1  # still away: nothing more arrived
        procs += [start(controller_args, clog)]
        outcomes = lambda: [o for _, o in events(lab / "state.db")]  # noqa: E731
        try:
            wait_for("every event handled", lambda: outcomes() == ["quarantine"] + ["already_quarantined"] * 2, 120)
        except AssertionError:
            raise AssertionError(f"outcomes {outcomes()}; agent's events {events(agent_db)};\n"
                                 f"controller: {clog.read_text()[-3000:]}\nagent: {alog.read_text()[-3000:]}") from None
    finally:
        for p in procs:
            polling.stop_process_group(p)
    assert [k for k, _ in events(lab / "state.db")] == [k for k, _ in events(agent_db)]
    audit = AuditLog(lab / "audit.db")
    assert [r.kind for r in audit.records()].count("failover.action") == 1
    assert [r.kind for r in audit.records()].count("transport.received") == 3
    audit.close()
