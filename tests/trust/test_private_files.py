"""What aidc creates is its owner's only: databases (and their -wal/-shm), audit anchors and
notify files 0600, the directories it makes for them 0700, whatever the umask says."""

import os
import stat

import pytest

from aidc.audit.log import AuditLog
from aidc.files import private_dir
from aidc.runbook.actuators import LogNotifier
from aidc.runbook.state import RunState
from aidc.store import Store


@pytest.fixture(autouse=True)
def permissive_umask():
    old = os.umask(0o022)  # the usual default: would give 0644 files and 0755 directories
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_private_db(path):
    assert mode(path) == 0o600
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():  # WAL mode with an open connection: both exist
            assert mode(side) == 0o600, side


def test_the_event_store_and_the_directories_made_for_it_are_private(tmp_path):
    store = Store(tmp_path / "new" / "lab" / "state.db")
    store.set_node_state("node1", "in_service", "test", "tester")
    assert (tmp_path / "new" / "lab" / "state.db-wal").exists()
    assert_private_db(tmp_path / "new" / "lab" / "state.db")
    assert mode(tmp_path / "new") == 0o700 and mode(tmp_path / "new" / "lab") == 0o700


def test_the_audit_database_its_anchor_and_anchor_lock_are_private(tmp_path):
    log = AuditLog(tmp_path / "audit" / "audit.db")
    log.append("test.event", "a reason", actor="tester")
    assert_private_db(tmp_path / "audit" / "audit.db")
    assert mode(tmp_path / "audit" / "audit.db.anchor") == 0o600
    assert mode(tmp_path / "audit" / "audit.db.anchor.lock") == 0o600
    assert mode(tmp_path / "audit") == 0o700


def test_the_runbook_state_database_is_private(tmp_path):
    state = RunState(tmp_path / "runbook" / "state.db")
    with state.transaction() as db:
        state.create_run(db, "rb", "node1", {"source": "test"}, [("s", "notify")])
    assert_private_db(tmp_path / "runbook" / "state.db")
    assert mode(tmp_path / "runbook") == 0o700


def test_the_notify_file_is_private(tmp_path):
    LogNotifier(tmp_path / "notify" / "out.jsonl").notify("info", "hello", {})
    assert mode(tmp_path / "notify" / "out.jsonl") == 0o600
    assert mode(tmp_path / "notify") == 0o700


def test_existing_directories_and_files_keep_their_permissions(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    os.chmod(shared, 0o750)
    private_dir(shared / "a" / "b")
    assert mode(shared) == 0o750
    assert mode(shared / "a") == 0o700 and mode(shared / "a" / "b") == 0o700
