"""`state.backend: postgres` in the stack: the failover commands read and write the shared
database, not LAB_DIR/state.db (the listener, `--listen`, too: tests/transport/test_listen_on_postgres.py)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")

from aidc.events import Action, FaultEvent, FaultKind  # noqa: E402
from aidc.state import open_event_store  # noqa: E402
from tests.test_failover_breaker_cli import ROOT  # noqa: E402


def _stack(tmp_path):
    doc = yaml.safe_load((ROOT / "Pulumi.lab.yaml").read_text())
    doc["config"]["aidc:cluster"]["state"] = {"backend": "postgres", "dsn_env": "AIDC_TEST_STATE_DSN"}
    path = tmp_path / "Pulumi.pg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_failover_status_reads_the_shared_database(aidc_cli, tmp_path, postgres_database):
    store = open_event_store("postgres", postgres_database)
    with store.transaction():
        event_id = store.append(FaultEvent("gpu-1", FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", xid=79))
    store.close()
    lab = tmp_path / "lab"
    (lab / "nodes").mkdir(parents=True)
    env = {**os.environ, "AIDC_TEST_STATE_DSN": postgres_database}
    proc = aidc_cli("failover", "status", "--stack", str(_stack(tmp_path)), "--lab-dir", str(lab), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [(e["id"], e["node"], e["pending"]) for e in json.loads(proc.stdout)["events"]] == [(event_id, "gpu-1", True)]
    assert not (lab / "state.db").exists()


def test_the_runbook_engines_gate_shares_the_controllers_database(tmp_path, postgres_database, monkeypatch):
    """Runbook quarantines and failover count one breaker window and one remediation history."""
    from aidc.runbook.context import EngineOptions, remediation_gate
    from aidc.spec import load_stack

    monkeypatch.setenv("AIDC_TEST_STATE_DSN", postgres_database)
    spec = load_stack(_stack(tmp_path))
    controller_side = open_event_store("postgres", postgres_database)
    controller_side.record_remediation("gpu-1", "reboot_node", "failover", "event 1", at=5.0)
    gate = remediation_gate(spec, EngineOptions(lab_dir=tmp_path / "lab", audit_db=tmp_path / "audit.db"))
    try:
        assert gate is not None
        assert [r["ref"] for r in gate.store.remediations(since=0)] == ["event 1"]
        assert not (tmp_path / "lab" / "state.db").exists()
    finally:
        gate.store.close()
        controller_side.close()
