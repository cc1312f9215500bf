"""`aidc state migrate --from sqlite:PATH --to postgres:DSN`: a site's event store moves to
PostgreSQL whole (ids, keys, decisions, node states, remediation history, settings, the store id),
in one transaction, verified row by row; a non-empty destination is refused."""

from __future__ import annotations

import json

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")

from aidc.errors import StateError  # noqa: E402
from aidc.events import Action, FaultEvent, FaultKind  # noqa: E402
from aidc.state import open_event_store  # noqa: E402
from aidc.state.migrate import migrate_state  # noqa: E402
from aidc.store import Store  # noqa: E402


def _site(path) -> Store:
    store = Store(path)
    with store.transaction():
        for n, xid in ((0, 79), (1, 48), (0, 63)):
            store.append(FaultEvent(node=f"gpu-{n}", kind=FaultKind.XID, action=Action.REBOOT_NODE,
                                    message=f"Xid {xid}", source="kmsg", xid=xid, observed_at=5.0))
    store.ingest("gpu-7:feed:3", FaultEvent(node="gpu-7", kind=FaultKind.ECC_DBE, action=Action.RESET_GPU,
                                            message="dbe", source="device"))
    store.mark_handled(1, "quarantined")
    store.mark_deferred(2, "deferred: capacity")
    store.set_node_state("gpu-0", "quarantined", "Xid 79", "failover")
    store.record_remediation("gpu-0", "reboot_node", "failover", "event 1", at=10.0)
    store.put("breaker.latched", json.dumps({"at": 12.0}))
    return store


def _contents(store) -> dict:
    return {"events": [(i, e, o, store.event_key(i)) for i, e, o in store.events()],
            "pending": store.pending(), "states": sorted(store.nodes_in_state("quarantined")),
            "remediations": store.remediations(since=0), "breaker": store.get("breaker.latched"),
            "store_id": store.store_id}


def test_a_site_moves_whole_and_new_events_never_reuse_a_key(tmp_path, postgres_database):
    source = _site(tmp_path / "state.db")
    before = _contents(source)
    source.close()

    summary = migrate_state(tmp_path / "state.db", postgres_database)
    assert summary["rows"] == {"events": 4, "node_state": 1, "remediations": 1, "kv": 2}

    moved = open_event_store("postgres", postgres_database)
    try:
        assert _contents(moved) == before
        with moved.transaction():
            new = moved.append(FaultEvent(node="gpu-2", kind=FaultKind.XID, action=Action.REBOOT_NODE,
                                          message="Xid 79", source="kmsg"))
        assert new > max(i for i, *_ in before["events"])
        assert len({k for *_, k in _contents(moved)["events"]}) == 5
    finally:
        moved.close()


def test_a_dry_run_counts_and_writes_nothing(tmp_path, postgres_database):
    _site(tmp_path / "state.db").close()
    summary = migrate_state(tmp_path / "state.db", postgres_database, dry_run=True)
    assert summary["rows"]["events"] == 4 and summary["dry_run"] is True
    with psycopg.connect(postgres_database) as conn:
        assert conn.execute("SELECT to_regclass('events')").fetchone()[0] is None


def test_a_destination_that_holds_events_is_refused_and_left_as_it_was(tmp_path, postgres_database):
    _site(tmp_path / "state.db").close()
    migrate_state(tmp_path / "state.db", postgres_database)
    with pytest.raises(StateError, match="already holds"):
        migrate_state(tmp_path / "state.db", postgres_database)
    store = open_event_store("postgres", postgres_database)
    assert len(store.events()) == 4
    store.close()


def test_a_missing_source_is_refused_without_creating_it(tmp_path, postgres_database):
    with pytest.raises(StateError, match="no SQLite store"):
        migrate_state(tmp_path / "nope.db", postgres_database)
    assert not (tmp_path / "nope.db").exists()


def test_the_command_moves_a_site_and_reports_json(aidc_cli, tmp_path, postgres_database):
    _site(tmp_path / "state.db").close()
    _audit(tmp_path / "audit.db")
    _runs(tmp_path / "runbook.db")
    bad = aidc_cli("state", "migrate", "--from", f"mysql:{tmp_path}", "--to", f"postgres:{postgres_database}")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    proc = aidc_cli("state", "migrate", "--from", f"sqlite:{tmp_path / 'state.db'}",
                    "--runbook-from", f"sqlite:{tmp_path / 'runbook.db'}", "--to", f"postgres:{postgres_database}",
                    "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows"]["events"] == 4 and summary["rows"]["audit"] == 5 and summary["rows"]["runs"] == 1
    assert summary["audit_verified"]["ok"] and summary["moved"] == ["event store", "audit log", "runbook state"]


def _audit(path, signer=None, n: int = 5) -> None:
    from aidc.audit.log import AuditLog

    with AuditLog(path, signer=signer) as log:
        for i in range(n):
            log.append("failover.action", f"quarantine gpu-{i}", actor="failover", node=f"gpu-{i}",
                       payload={"event_id": i + 1, "run_id": i})


def _runs(path) -> int:
    from aidc.runbook.state import RunState

    state = RunState(path)
    with state.transaction() as db:
        run_id = state.create_run(db, "xid-79", "gpu-0", {"user": "carol"}, [("cordon", "quarantine")])
        state.record_alert(db, "fp", "t0", run_id)
    state.mark_step_running(run_id, 0)
    state.approve(run_id, 0, "carol")
    state.close()
    return run_id


def test_the_audit_log_and_runbook_state_move_too_and_the_signed_chain_verifies_in_postgres(tmp_path,
                                                                                           postgres_database):
    from aidc.audit.log import AuditLog
    from aidc.kms.local import LocalKeyring
    from aidc.state import open_audit_log, open_run_state

    keyring = LocalKeyring.create(tmp_path / "keyring", "audit")
    _site(tmp_path / "state.db").close()
    _audit(tmp_path / "audit.db", signer=keyring)
    run_id = _runs(tmp_path / "runbook.db")
    with AuditLog(tmp_path / "audit.db", read_only=True) as source:
        before = source.records()

    summary = migrate_state(tmp_path / "state.db", postgres_database, run_state_path=tmp_path / "runbook.db")
    assert summary["moved"] == ["event store", "audit log", "runbook state"]
    assert summary["rows"]["audit"] == 5 and summary["rows"]["audit_signature"] == 5 and summary["rows"]["runs"] == 1
    assert summary["audit_verified"]["ok"] and summary["audit_verified"]["records"] == 5

    moved = open_audit_log("postgres", postgres_database, signer=keyring)
    try:
        assert moved.records() == before
        assert moved.verify(public_key_pem=keyring.public_key_pem()).ok  # the file anchor's signature moved too
        assert [r.seq for r in moved.find("failover.action", run_id=3)] == [4]
        moved.append("state.migrated", "carried on in PostgreSQL", actor="test")
        assert moved.verify(public_key_pem=keyring.public_key_pem()).records == 6
    finally:
        moved.close()
    state = open_run_state("postgres", postgres_database)
    try:
        assert [(s.step_id, s.status, s.attempts) for s in state.steps(run_id)] == [("cordon", "running", 1)]
        assert state.approval(run_id, 0) == "carol"
        with state.transaction() as db:
            assert state.lock_holder(db, "gpu-0") == run_id
            assert state.alert_seen(db, "fp", "t0") == run_id
            assert state.create_run(db, "xid-79", "gpu-1", {}, []) > run_id  # run ids are never reused
    finally:
        state.close()


def test_an_audit_log_that_does_not_verify_is_not_moved(tmp_path, postgres_database):
    import sqlite3

    _site(tmp_path / "state.db").close()
    _audit(tmp_path / "audit.db")
    with sqlite3.connect(tmp_path / "audit.db") as db:
        db.execute("UPDATE audit SET reason = 'nothing happened' WHERE seq = 2")
    with pytest.raises(StateError, match="does not verify at record 2"):
        migrate_state(tmp_path / "state.db", postgres_database)
    with psycopg.connect(postgres_database) as conn:
        assert conn.execute("SELECT to_regclass('events')").fetchone()[0] is None  # nothing moved


def test_a_destination_holding_only_an_audit_log_is_refused(tmp_path, postgres_database):
    from aidc.state import open_audit_log

    with open_audit_log("postgres", postgres_database) as log:
        log.append("x", "already here", actor="test")
    _site(tmp_path / "state.db").close()
    with pytest.raises(StateError, match=r"already holds state \(audit, audit_anchor\)"):
        migrate_state(tmp_path / "state.db", postgres_database)
