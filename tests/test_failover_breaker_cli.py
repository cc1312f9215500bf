"""Escalation and the breaker through the CLI and real controller processes.

Specification: `aidc failover run` killed and started again (a real restart) keeps what it knew:
an event refused for capacity is quarantined once capacity returns, exactly once; a fault's
earlier sightings, seen by the first process, still escalate its repeat in the second.
`aidc failover breaker status|reset` reports and closes the breaker; a reset needs the approver
role and a reason, and bad commands are one clear error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from aidc import polling
from aidc.audit import AuditLog
from aidc.device.sim import create_node
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.remediation import RemediationGate
from aidc.identity import cli_identity
from aidc.installation import record as install
from aidc.spec import load_stack
from aidc.store import Store

ROOT = Path(__file__).resolve().parents[1]
NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]


def write_stack(path: Path, roles: dict | None = None, **policy) -> Path:
    doc = yaml.safe_load((ROOT / "Pulumi.lab.yaml").read_text())
    cluster = doc["config"]["aidc:cluster"]
    cluster["policy"].update(policy)
    if roles:
        cluster["access"] = {"roles": roles}
    path.write_text(yaml.safe_dump(doc))
    return path


def fault(node: str, xid: int, action: Action, at: float) -> FaultEvent:
    return FaultEvent(node, FaultKind.XID, action, f"XID {xid}", "kmsg", gpu=0, xid=xid, observed_at=at)


def outcomes(lab: Path) -> dict[int, str | None]:
    store = Store(lab / "state.db")
    try:
        return {i: o for i, _, o in store.events()}
    finally:
        store.close()


def pending(lab: Path) -> list[int]:
    store = Store(lab / "state.db")
    try:
        return [i for i, _ in store.pending()]
    finally:
        store.close()


def append(lab: Path, event: FaultEvent) -> int:
    store = Store(lab / "state.db")
    try:
        with store.transaction():
            return store.append(event)
    finally:
        store.close()


def journal(lab: Path, node: str) -> list[str]:
    path = lab / "nodes" / node / "scheduler.jsonl"
    return [json.loads(line)["op"] for line in path.read_text().splitlines()] if path.exists() else []


def start_controller(stack: Path, lab: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aidc", "failover", "run", "--stack", str(stack),
                             "--lab-dir", str(lab), "--no-dry-run", "--poll", "0.05", "--lease-ttl", "2", *extra],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_a_refused_event_is_acted_on_once_after_a_real_restart_and_escalation_history_survives_it(
        tmp_path, aidc_cli):
    lab = tmp_path / "lab"
    for i, name in enumerate(NODES):
        create_node(lab / "nodes" / name, name, gpus=2, node_index=i)
    stack = write_stack(tmp_path / "Pulumi.t.yaml", max_unavailable=1, deferred_recheck_s=3600,
                        escalation={"repeats": 3, "window_min": 60, "burst_s": 0})
    log, t0 = tmp_path / "controller.log", time.time()
    Store(lab / "state.db").close()
    first = start_controller(stack, lab, log)
    procs = [first]
    try:
        # Two sightings of a restart_app XID on gpu-3, then a quarantine that fills the blast radius
        # and a second fault refused by it.
        e1 = append(lab, fault("gpu-3", 8, Action.RESTART_APP, t0 - 300))
        e2 = append(lab, fault("gpu-3", 8, Action.RESTART_APP, t0 - 200))
        e3 = append(lab, fault("gpu-1", 62, Action.RESET_GPU, t0 - 100))
        e4 = append(lab, fault("gpu-2", 62, Action.RESET_GPU, t0 - 50))
        polling.wait_for("the first controller's decisions", lambda: outcomes(lab) == {
            e1: "no_action", e2: "no_action", e3: "quarantine", e4: "refused_blast_radius"}, 120)
        assert pending(lab) == [e4]
        status = aidc_cli("failover", "status", "--stack", str(stack), "--lab-dir", str(lab), "--json")
        assert [(e["outcome"], e["pending"]) for e in json.loads(status.stdout)["events"] if e["id"] == e4] == \
            [("refused_blast_radius", True)]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)

        # A person releases gpu-1 while no controller runs; the next one acts on the waiting event.
        released = aidc_cli("failover", "release", "gpu-1", "--reason", "GPU reseated", "--stack", str(stack),
                            "--lab-dir", str(lab))
        assert released.returncode == 0, released.stderr
        port = polling.free_port()
        procs.append(start_controller(stack, lab, log, "--metrics-port", str(port)))
        polling.wait_for("the refused event acted on", lambda: outcomes(lab)[e4] == "quarantine", 120)
        assert pending(lab) == [] and journal(lab, "gpu-2") == ["quarantine"]

        # The third sighting on gpu-3 escalates in the second process from the first one's history.
        assert aidc_cli("failover", "release", "gpu-2", "--reason", "ok", "--stack", str(stack),
                        "--lab-dir", str(lab)).returncode == 0
        e5 = append(lab, fault("gpu-3", 8, Action.RESTART_APP, t0))
        polling.wait_for("the escalated fault quarantined", lambda: outcomes(lab).get(e5) == "quarantine", 120)
        metrics = scrape(port)
        assert 'aidc_failover_escalations_total{from_action="restart_app",to_action="reset_gpu"} 1.0' in metrics
        assert "aidc_failover_breaker_open 0.0" in metrics
        # The only controller running holds the lease, and it has decided every event.
        assert "aidc_failover_lease_held 1.0" in metrics
        assert "aidc_failover_oldest_undecided_event_age_seconds 0.0" in metrics
        time.sleep(0.5)  # a few more polls: nothing may be repeated
    finally:
        for proc in procs:
            polling.stop_process_group(proc)
    assert journal(lab, "gpu-2") == ["quarantine", "release"] and journal(lab, "gpu-3") == ["quarantine"]
    audit = AuditLog(lab / "audit.db")
    try:
        actions = [r.node for r in audit.records(kind="failover.action")]
        assert sorted(actions) == ["gpu-1", "gpu-2", "gpu-3"]
        [escalation] = audit.records(kind="failover.escalation")
        assert [h["events"] for h in escalation.payload["history"]] == [[e1], [e2], [e5]]
        assert escalation.payload["to_action"] == "reset_gpu"
        assert audit.verify().ok
    finally:
        audit.close()


def open_breaker(lab: Path, stack: Path) -> None:
    """Trip the breaker as the controller would: two quarantines against a limit of one."""
    spec = load_stack(str(stack))
    store, audit = Store(lab / "state.db"), AuditLog(lab / "audit.db")
    gate = RemediationGate(spec, store, audit)
    with store.transaction():
        gate.record("gpu-0", "reboot_node", "failover", "event 1")
    assert gate.admit("gpu-1", ref="event 2")
    store.close()
    audit.close()


def test_breaker_status_and_reset_by_an_approver(tmp_path, aidc_cli):
    lab = tmp_path / "lab"
    stack = write_stack(tmp_path / "Pulumi.t.yaml", roles={cli_identity(): "approver"},
                        breaker={"max_quarantines": 1})
    lab.mkdir()
    open_breaker(lab, stack)
    install(lab, load_stack(str(stack)), str(stack))  # the installer's roles
    args = ("--stack", str(stack), "--lab-dir", str(lab))
    status = aidc_cli("failover", "breaker", "status", *args, "--json")
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["breaker"]["open"] is True and view["limit"] == 1 and view["quarantines_in_window"] == 1
    assert "OPEN" in aidc_cli("failover", "breaker", "status", *args).stdout
    reset = aidc_cli("failover", "breaker", "reset", "--reason", "rollout reverted", *args, "--json")
    assert reset.returncode == 0, reset.stderr
    assert json.loads(reset.stdout)["was_open"] is True
    assert json.loads(aidc_cli("failover", "breaker", "status", *args, "--json").stdout)["breaker"]["open"] is False
    audit = AuditLog(lab / "audit.db")
    [record] = audit.records(kind="failover.breaker.reset")
    assert record.actor == cli_identity() and record.reason == "rollout reverted"
    audit.close()


def test_a_breaker_reset_by_someone_without_the_approver_role_is_refused(tmp_path, aidc_cli):
    lab = tmp_path / "lab"
    stack = write_stack(tmp_path / "Pulumi.t.yaml", roles={cli_identity(): "operator", "user:alice": "approver"},
                        breaker={"max_quarantines": 1})
    lab.mkdir()
    open_breaker(lab, stack)
    install(lab, load_stack(str(stack)), str(stack))  # the installer's roles
    proc = aidc_cli("failover", "breaker", "reset", "--reason", "looks fine", "--stack", str(stack),
                    "--lab-dir", str(lab))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("aidc: error:") and "needs role approver" in proc.stderr
    store = Store(lab / "state.db")
    assert json.loads(store.get("failover.breaker"))["open"] is True  # still open
    store.close()
    audit = AuditLog(lab / "audit.db")
    assert [r.payload["action"] for r in audit.records(kind="access.refused")] == \
        ["reset the failover circuit breaker"]
    assert audit.records(kind="failover.breaker.reset") == []
    audit.close()


@pytest.mark.parametrize("args, says", [
    (("failover", "breaker", "frobnicate"), "No such command 'frobnicate'"),
    (("failover", "breaker", "reset"), "Missing option '--reason'"),
])
def test_an_unknown_breaker_subcommand_or_a_missing_reason_is_a_usage_error(aidc_cli, args, says):
    proc = aidc_cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and says in proc.stderr


def test_an_empty_reason_or_a_missing_lab_is_one_error_line(tmp_path, aidc_cli):
    for args, says in ((("--reason", " ", "--lab-dir", str(tmp_path)), "--reason must say why"),
                       (("--reason", "ok", "--lab-dir", str(tmp_path / "none")), "no lab state")):
        proc = aidc_cli("failover", "breaker", "reset", *args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("aidc: error:"), proc.stderr
        assert says in lines[0]
