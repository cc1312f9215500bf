"""`--state LOCATION` (or AIDC_STATE), the one flag naming the state: each command family that opens
the event store, the run state or the audit log reads it there, on SQLite and on a real
PostgreSQL, overriding the stack's `state:` (the lab stack's is SQLite in the state directory)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aidc.events import Action, FaultEvent, FaultKind
from aidc.state import open_audit_log, open_event_store, open_run_state

ROOT = Path(__file__).resolve().parents[2]
LAB_STACK = str(ROOT / "Pulumi.lab.yaml")


def _flag(backend: str, location: str) -> str:
    return f"{backend}:{location}"  # the explicit form; the bare forms are unit-tested in test_cli_surface


@pytest.mark.slow
def test_failover_status_reads_the_event_store_the_state_flag_names(aidc_cli, tmp_path, state_location):
    store = open_event_store(*state_location)
    with store.transaction():
        event_id = store.append(FaultEvent("gpu-2", FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", xid=79))
    store.close()
    lab = tmp_path / "lab"
    (lab / "nodes").mkdir(parents=True)
    proc = aidc_cli("failover", "status", "--stack", LAB_STACK, "--state-dir", str(lab),
                    "--state", _flag(*state_location), "--json")
    assert proc.returncode == 0, proc.stderr
    assert [(e["id"], e["node"]) for e in json.loads(proc.stdout)["events"]] == [(event_id, "gpu-2")]
    assert not (lab / "state.db").exists()  # not the stack's SQLite file in the state directory


@pytest.mark.slow
def test_runbook_runs_reads_the_run_state_aidc_state_names(aidc_cli, state_location):
    runs = open_run_state(*state_location)
    with runs.transaction() as db:
        run_id = runs.create_run(db, "xid-79", "gpu-1", {"user": "carol"}, [("tell", "notify")])
    runs.close()
    env = {**os.environ, "AIDC_STATE": _flag(*state_location)}
    proc = aidc_cli("runbook", "runs", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [(r["id"], r["runbook"], r["node"]) for r in json.loads(proc.stdout)] == [(run_id, "xid-79", "gpu-1")]


@pytest.mark.slow
def test_audit_show_and_verify_read_the_log_the_state_flag_names(aidc_cli, tmp_path, state_location):
    with open_audit_log(*state_location, state_dir=tmp_path) as log:
        log.append("note", "one", actor="test", node="n1")
        log.append("note", "two", actor="test", node="n2")
    common = ["--state", _flag(*state_location), "--state-dir", str(tmp_path), "--json"]
    shown = aidc_cli("audit", "show", "--node", "n2", *common)
    assert shown.returncode == 0, shown.stderr
    assert [r["reason"] for r in json.loads(shown.stdout)] == ["two"]
    verified = aidc_cli("audit", "verify", *common)
    assert verified.returncode == 0 and json.loads(verified.stdout)["records"] == 2, verified.stderr
