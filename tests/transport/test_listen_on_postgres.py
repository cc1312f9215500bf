"""`aidc failover run --listen` with `state.backend: postgres`: agents' events are received into
the shared database, decided there, audited in the database's audit log, and a controller killed
and restarted carries on from it; nothing is written to LAB_DIR/state.db or LAB_DIR/audit.db."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aidc import polling
from aidc.device.sim import create_node, inject
from tests.state.test_failover_cli_on_postgres import _stack
from tests.transport.transport_helpers import NODES, ROOT_AGENTS, wait_for

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")
pytestmark = pytest.mark.slow


def _start(args, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aidc", *args], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env={**env, "PYTHONPATH": ROOT_AGENTS}, start_new_session=True)


def _quarantined_once(outcomes: list[str | None]) -> bool:
    return outcomes[:1] == ["quarantine"] and all(o == "already_quarantined" for o in outcomes[1:])


def test_a_listening_controller_on_postgres_decides_agents_events_and_survives_a_kill(pki, tmp_path,
                                                                                      postgres_database, aidc_cli):
    lab, stack = tmp_path / "lab", _stack(tmp_path)
    for i, name in enumerate(NODES):
        create_node(lab / "nodes" / name, name, gpus=2, node_index=i)
    env = {**os.environ, "AIDC_TEST_STATE_DSN": postgres_database}
    node_dir, port = lab / "nodes" / "gpu-1", polling.free_port()
    controller_args = ["failover", "run", "--stack", str(stack), "--lab-dir", str(lab), "--no-dry-run",
                       "--listen", f"127.0.0.1:{port}", "--tls-cert", str(pki["server"].cert),
                       "--tls-key", str(pki["server"].key), "--client-ca", str(pki["ca"].cert_file)]
    agent_args = ["agent", "run", "--node", "gpu-1", "--backend", "sim", "--node-dir", str(node_dir),
                  "--store", str(tmp_path / "agent" / "store.db"), "--audit-db", str(tmp_path / "agent" / "audit.db"),
                  "--port", "0", "--poll-interval", "0.05", "--controller-url", f"https://127.0.0.1:{port}",
                  "--tls-cert", str(pki["gpu-1"].cert), "--tls-key", str(pki["gpu-1"].key),
                  "--ca", str(pki["ca"].cert_file)]

    def outcomes() -> list[str | None]:
        with psycopg.connect(postgres_database) as conn:
            return [r[0] for r in conn.execute("SELECT outcome FROM events WHERE node = 'gpu-1' ORDER BY id")]

    clog, alog = tmp_path / "controller.log", tmp_path / "agent.log"

    def wait(what: str, predicate, timeout_s: float = 120) -> None:
        try:
            wait_for(what, predicate, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; outcomes {outcomes()}\ncontroller: {clog.read_text()[-3000:]}\n"
                                 f"agent: {alog.read_text()[-3000:]}") from None

    procs = [_start(controller_args, clog, env), _start(agent_args, alog, env)]
    try:
        wait("the listener", lambda: "receiving fault events" in clog.read_text())
        wait("the agent", lambda: "watching gpu-1" in alog.read_text())
        inject(node_dir, "xid", 0, xid=79)
        # Xid 79 may also be seen as the GPU falling off the bus: one quarantine, then "already".
        wait("the quarantine decided in PostgreSQL", lambda: _quarantined_once(outcomes()))
        assert (node_dir / "quarantined").exists()
        before = len(outcomes())

        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        procs.append(_start(controller_args, clog, env))
        inject(node_dir, "xid", 1, xid=109)
        wait("the restarted controller's decision", lambda: len(outcomes()) > before and _quarantined_once(outcomes()))
    finally:
        for p in procs:
            polling.stop_process_group(p)
    assert not (lab / "state.db").exists() and not (lab / "audit.db").exists()
    verified = aidc_cli("audit", "verify", "--stack", str(stack), "--db", str(lab / "audit.db"), "--json", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"]
    shown = aidc_cli("audit", "show", "--stack", str(stack), "--state-dir", str(lab), "--json", env=env)
    kinds = [r["kind"] for r in json.loads(shown.stdout)]
    assert kinds.count("transport.received") == len(outcomes()) and kinds.count("failover.action") == 1
