"""/healthz and /readyz of the real daemons: `aidc agent run`, `aidc failover run`, `aidc runbook serve`.

Specification: each answers JSON on /healthz (alive, main loop turned within --stall-after) and
/readyz (its own readiness, and live), 200 or 503. A loop is made to stick for real: the test
holds the audit log's anchor lock (as another writer would), so the next audit record the loop
writes waits; the probes go 503, and come back to 200 when the lock is let go. The controller's
metrics server binds --listen-address like the agent's, and a standby controller is ready but
says it is not the leader.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from aidc import polling
from aidc.device import sim
from aidc.events import Action
from aidc.store import Store
from tests.test_failover_breaker_cli import append, fault, write_stack
from tests.health.test_listen_address import listening_on

STALL_AFTER = "1.5"


def probe(port: int, path: str) -> tuple[int, dict] | None:
    """(status, JSON body) of GET path; None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("application/json")
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers["Content-Type"].startswith("application/json")
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


def status_of(port: int, path: str) -> int | None:
    answer = probe(port, path)
    return answer[0] if answer else None


def wait_status(port: int, path: str, code: int, timeout: float = 60) -> dict:
    polling.wait_for(f"{path} answering {code}", lambda: status_of(port, path) == code, timeout, 0.05,
                     error=AssertionError)
    return probe(port, path)[1]


@contextmanager
def audit_writers_held(audit_db: Path):
    """Hold the audit log's anchor lock: every audit append in another process waits for it."""
    with open(str(audit_db) + ".anchor.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def stuck_then_recovered(port: int, audit_db: Path, work) -> None:
    """Give the loop `work` that needs an audit record while the audit lock is held: both probes
    go 503; let go of the lock and both are 200 again."""
    with audit_writers_held(audit_db):
        work()
        wait_status(port, "/healthz", 503)
        assert status_of(port, "/readyz") == 503
    wait_status(port, "/healthz", 200)
    assert status_of(port, "/readyz") == 200


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aidc", *args], stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    polling.stop_process_group(proc)


# -- the failover controller ------------------------------------------------------------------

def controller(tmp_path: Path, lab: Path, port: int, *extra: str) -> subprocess.Popen:
    stack = write_stack(tmp_path / "Pulumi.t.yaml")
    return start(["failover", "run", "--stack", str(stack), "--lab-dir", str(lab), "--dry-run", "--poll", "0.05",
                  "--lease-ttl", "30", "--metrics-port", str(port), "--stall-after", STALL_AFTER, *extra],
                 tmp_path / f"controller-{port}.log")


@pytest.fixture
def lab(tmp_path):
    lab = tmp_path / "lab"
    for i, name in enumerate(["gpu-0", "gpu-1"]):
        sim.create_node(lab / "nodes" / name, name, gpus=1, node_index=i)
    Store(lab / "state.db").close()
    return lab


def test_a_controller_is_not_ready_until_its_loop_runs_and_fails_liveness_while_it_is_stuck(tmp_path, lab):
    port = polling.free_port()
    with audit_writers_held(lab / "audit.db"):
        proc = controller(tmp_path, lab, port)
        try:
            # The loop's first audit record (the lease acquired) waits for the lock: not ready,
            # and once the threshold passes, not live either.
            polling.wait_for("the probe server", lambda: status_of(port, "/readyz") is not None, 60,
                             error=AssertionError)
            assert probe(port, "/readyz")[1]["ready"] is False
            assert status_of(port, "/readyz") == 503
            wait_status(port, "/healthz", 503)
        except BaseException:
            stop(proc)
            raise
    try:
        body = wait_status(port, "/readyz", 200)
        assert body["leader"] is True and body["component"] == "failover-controller"
        assert status_of(port, "/healthz") == 200

        # Stuck in the middle of its work: the decision on a new event waits to be audited.
        stuck_then_recovered(port, lab / "audit.db",
                             lambda: append(lab, fault("gpu-1", 8, Action.RESTART_APP, time.time())))
    finally:
        stop(proc)


def test_a_standby_controller_is_ready_and_says_it_is_not_the_leader(tmp_path, lab):
    leader_port, standby_port = polling.free_port(), polling.free_port()
    procs = [controller(tmp_path, lab, leader_port)]
    try:
        assert wait_status(leader_port, "/readyz", 200)["leader"] is True
        procs.append(controller(tmp_path, lab, standby_port))
        body = wait_status(standby_port, "/readyz", 200)
        assert body["leader"] is False and body["ready"] is True
        assert probe(leader_port, "/readyz")[1]["leader"] is True
    finally:
        for proc in procs:
            stop(proc)


def test_the_controller_metrics_server_binds_the_listen_address(tmp_path, lab):
    port = polling.free_port()
    proc = controller(tmp_path, lab, port, "--listen-address", "0.0.0.0")
    try:
        wait_status(port, "/readyz", 200)
        assert listening_on(port) == {"0.0.0.0"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"aidc_failover_breaker_open" in response.read()
    finally:
        stop(proc)


def test_a_controller_listen_address_that_is_not_an_ip_is_a_usage_error(tmp_path, lab, aidc_cli):
    stack = write_stack(tmp_path / "Pulumi.t.yaml")
    r = aidc_cli("failover", "run", "--stack", str(stack), "--lab-dir", str(lab), "--metrics-port", "0",
                 "--listen-address", "controller.local")
    assert r.returncode == 2 and "--listen-address" in r.stderr and "an IP address" in r.stderr


# -- the node agent ------------------------------------------------------------------------------

def test_an_agent_is_ready_after_its_first_read_and_fails_liveness_while_its_loop_is_stuck(tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    port = polling.free_port()
    proc = start(["agent", "run", "--node", "n1", "--backend", "sim", "--node-dir", str(node_dir),
                  "--store", str(tmp_path / "store.db"), "--audit-db", str(tmp_path / "audit.db"),
                  "--poll-interval", "0.05", "--port", str(port), "--stall-after", STALL_AFTER],
                 tmp_path / "agent.log")
    try:
        body = wait_status(port, "/readyz", 200)
        assert body["node"] == "n1" and body["component"] == "agent"
        assert status_of(port, "/healthz") == 200
        # Its fault record waits for the lock.
        stuck_then_recovered(port, tmp_path / "audit.db", lambda: sim.inject(node_dir, "xid", gpu=0, xid=79))
    finally:
        stop(proc)


# -- the runbook receiver ------------------------------------------------------------------------

def test_the_receiver_answers_both_probes_unauthenticated_with_its_catalog(tmp_path):
    from tests.runbook.serve_proc import ServeProcess

    serve = ServeProcess(tmp_path, "secret-token", ["--state-db", str(tmp_path / "state.db"),
                                                     "--audit-db", str(tmp_path / "audit.db"),
                                                     "--stall-after", STALL_AFTER]).start()
    try:
        body = wait_status(serve.port, "/readyz", 200)
        assert body["ready"] is True and body["runbooks"] > 0
        assert probe(serve.port, "/healthz")[0] == 200
    finally:
        serve.stop()


# -- scraped: the lab's Prometheus --------------------------------------------------------------

def test_the_lab_prometheus_scrapes_the_controller_and_the_receiver(tmp_path, lab):
    from aidc.runbook.promstack import PromStack, missing_binaries
    from tests.runbook.serve_proc import ServeProcess

    if missing_binaries():
        pytest.skip(f"needs {', '.join(missing_binaries())}")
    rules = Path(__file__).resolve().parents[1] / "runbooks" / "alerts" / "aidc-alerts.yml"
    port = polling.free_port()
    proc = controller(tmp_path, lab, port)
    serve = stack = None
    try:
        serve = ServeProcess(tmp_path, "scrape-t0ken", ["--state-db", str(tmp_path / "state.db"),
                                                        "--audit-db", str(tmp_path / "audit.db")]).start()
        (tmp_path / "token").write_text("scrape-t0ken")
        stack = PromStack(tmp_path / "prom", {}, rules, serve.url, tmp_path / "token", controller_ports=[port]).start()

        def up(job: str) -> bool:
            return [r["value"][1] for r in stack.query(f'up{{job="{job}"}}')] == ["1"]

        polling.wait_for("both scraped", lambda: up("aidc-failover-controller") and up("aidc-runbook-receiver"),
                         60, 0.5, error=AssertionError)
        # What AidcFailoverBreakerOpen reads is in Prometheus now.
        assert [r["value"][1] for r in stack.query("aidc_failover_breaker_open")] == ["0"]
    finally:
        if stack:
            stack.stop()
        if serve:
            serve.stop()
        stop(proc)


def test_the_lab_controller_serves_metrics_and_probes_on_the_port_the_lab_records(tmp_path):
    from aidc.lab.cluster import LabCluster
    from aidc.spec import load_stack

    cluster = LabCluster(load_stack("lab"), tmp_path / "lab", say=lambda *_: None)
    cluster.create()
    try:
        cluster.start_controller("lab")
        body = wait_status(cluster.port("metrics:failover"), "/readyz", 200, timeout=120)
        assert body["component"] == "failover-controller"
    finally:
        cluster.stop()
