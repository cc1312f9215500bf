"""The audit log: append-only, hash-chained, and every kind of tampering is named."""

import fcntl
import json
import sqlite3
import threading

import pytest

from aidc.audit import AuditLog
from aidc.audit import log as audit_log


@pytest.fixture
def log(tmp_path):
    log = AuditLog(tmp_path / "audit.db")
    for i in range(6):
        log.append("burnin.certificate", f"record {i}", actor="test", node=f"n{i % 2}", payload={"i": i})
    yield log
    log.close()


def _sql(log, statement, *args):
    db = sqlite3.connect(log.path)
    db.execute(statement, args)
    db.commit()
    db.close()


def test_an_untouched_log_verifies(log):
    result = log.verify()
    assert result.ok and result.records == 6


def test_an_edited_row_is_named(log):
    _sql(log, "UPDATE audit SET reason = 'nothing happened' WHERE seq = 4")
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 4


def test_an_edited_payload_is_named(log):
    _sql(log, "UPDATE audit SET payload = '{\"i\": 99}' WHERE seq = 2")
    assert log.verify().first_bad_seq == 2


def test_a_deleted_row_is_named(log):
    _sql(log, "DELETE FROM audit WHERE seq = 3")
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3


def test_reordered_rows_are_caught(log):
    _sql(log, "UPDATE audit SET seq = 100 WHERE seq = 2")
    _sql(log, "UPDATE audit SET seq = 2 WHERE seq = 5")
    _sql(log, "UPDATE audit SET seq = 5 WHERE seq = 100")
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 2


def test_truncation_is_caught_by_the_anchor(log):
    _sql(log, "DELETE FROM audit WHERE seq >= 5")
    result = log.verify()
    assert not result.ok and "truncated" in result.problem and result.first_bad_seq == 5


def test_appends_from_two_connections_keep_one_chain(tmp_path):
    a, b = AuditLog(tmp_path / "a.db"), AuditLog(tmp_path / "a.db")
    for i in range(10):
        (a if i % 2 else b).append("x", str(i), actor="t")
    assert a.verify().ok and a.verify().records == 10


@pytest.mark.parametrize("records_before", [0, 3])
@pytest.mark.parametrize("lands", ["before", "after"])
def test_an_append_landing_while_verify_reads_is_not_taken_for_tampering(tmp_path, monkeypatch, records_before,
                                                                          lands):
    writer, reader = AuditLog(tmp_path / "audit.db"), AuditLog(tmp_path / "audit.db")
    for i in range(records_before):
        writer.append("x", str(i), actor="writer")
    read_anchor = reader._read_anchor

    def anchor_read_with_an_append_landing():
        # Another process commits a record (and moves the anchor) just before or just after
        # verify reads the anchor: once, in the middle of verify.
        monkeypatch.setattr(reader, "_read_anchor", read_anchor)
        if lands == "before":
            writer.append("x", "racing", actor="writer")
        anchor = read_anchor()
        if lands == "after":
            writer.append("x", "racing", actor="writer")
        return anchor

    monkeypatch.setattr(reader, "_read_anchor", anchor_read_with_an_append_landing)
    result = reader.verify()
    assert result.ok, result.problem


def _wait_until_finished_or_waiting(thread: threading.Thread, waiting: threading.Event) -> None:
    for _ in range(3000):  # bounded: either happens within moments
        if waiting.wait(0.01) or not thread.is_alive():
            return
    raise AssertionError(f"{thread.name} neither finished nor waited")


def test_the_anchor_never_moves_back_when_writers_finish_out_of_order(tmp_path, monkeypatch):
    a, b = AuditLog(tmp_path / "audit.db"), AuditLog(tmp_path / "audit.db")
    a.append("x", "1", actor="a")
    b_appends = threading.Thread(target=b.append, args=("x", "3"), kwargs={"actor": "b"}, name="writer b")
    b_waits_for_the_anchor = threading.Event()
    flock = fcntl.flock

    def observed_flock(fd, operation):
        if threading.current_thread() is b_appends:
            b_waits_for_the_anchor.set()
        return flock(fd, operation)

    read_anchor = a._read_anchor

    def b_appends_while_a_updates_the_anchor():
        # a has committed record 2 and is updating the anchor (it reads 1): b commits record 3
        # now and either updates the anchor to 3 at once or waits for a's update to finish.
        monkeypatch.setattr(a, "_read_anchor", read_anchor)
        current = read_anchor()
        b_appends.start()
        _wait_until_finished_or_waiting(b_appends, b_waits_for_the_anchor)
        return current

    monkeypatch.setattr(fcntl, "flock", observed_flock)
    monkeypatch.setattr(a, "_read_anchor", b_appends_while_a_updates_the_anchor)
    a.append("x", "2", actor="a")
    b_appends.join(timeout=60)
    assert json.loads(a.anchor_path.read_text())["seq"] == 3
    _sql(a, "DELETE FROM audit WHERE seq = 3")
    result = a.verify()
    assert not result.ok and "truncated" in result.problem


class _ObservedLock:
    """A lock that tells when some thread had to wait for it."""

    def __init__(self, lock):
        self.lock, self.contended = lock, threading.Event()

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            self.contended.set()
            self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def test_threads_sharing_one_log_append_one_at_a_time(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "audit.db")
    log._lock = observed = _ObservedLock(log._lock)
    errors = []

    def append_second():
        try:
            log.append("x", "second", actor="t2")
        except Exception as exc:  # the failure this test is about; reported below
            errors.append(repr(exc))

    second = threading.Thread(target=append_second, name="second appender")
    record_hash = audit_log.record_hash

    def hash_while_another_thread_appends(*args):
        # The first append is inside its transaction now: the second thread appends meanwhile.
        monkeypatch.setattr(audit_log, "record_hash", record_hash)
        second.start()
        _wait_until_finished_or_waiting(second, observed.contended)
        return record_hash(*args)

    monkeypatch.setattr(audit_log, "record_hash", hash_while_another_thread_appends)
    log.append("x", "first", actor="t1")
    second.join(timeout=60)
    assert errors == []
    assert [r.reason for r in log.records()] == ["first", "second"]
    assert log.verify().ok


def test_cli_verify_exits_non_zero_and_names_the_record(aidc_cli, log):
    assert aidc_cli("audit", "verify", "--db", str(log.path)).returncode == 0
    _sql(log, "UPDATE audit SET actor = 'mallory' WHERE seq = 1")
    out = aidc_cli("audit", "verify", "--db", str(log.path))
    assert out.returncode == 1 and "record 1" in out.stdout


# --- reading a file that may not be an audit log (issue #13, class 8) ------------------------

def _fingerprint(path):
    """What reading must leave unchanged: the file's bytes, its mtime, and its neighbours."""
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


def test_verify_refuses_another_programs_sqlite_file_and_leaves_it_as_it_was(tmp_path, aidc_cli):
    foreign = tmp_path / "inventory.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE hosts (name TEXT)")
    db.execute("INSERT INTO hosts VALUES ('gpu-0')")
    db.commit()
    db.close()
    before = _fingerprint(foreign)
    out = aidc_cli("audit", "verify", "--db", str(foreign))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "not an aidc audit log" in out.stderr and "hosts" in out.stderr
    assert _fingerprint(foreign) == before  # not converted to WAL, no table added
    with pytest.raises(audit_log.AuditError, match="not an aidc audit log"):
        AuditLog(foreign)  # a writer pointed at it by mistake refuses too


def test_verify_reads_a_real_log_without_changing_a_byte(log, aidc_cli):
    log.close()
    before = _fingerprint(log.path)
    out = aidc_cli("audit", "verify", "--db", str(log.path))
    assert out.returncode == 0 and "OK, 6 records" in out.stdout
    data, mtime, neighbours = _fingerprint(log.path)
    assert (data, mtime) == before[:2]
    # A log in WAL mode is read through SQLite's own -wal/-shm files (its writers use them
    # too); nothing else appears beside it.
    assert set(neighbours) - set(before[2]) <= {"audit.db-wal", "audit.db-shm"}


@pytest.mark.parametrize("anchor", ["[1, 2]", '{"seq": null}', '{"seq": 6}', '{"seq": true, "hash": "x"}',
                                    "\x00\xff garbage", "directory"])
def test_a_bad_anchor_is_a_verification_failure_with_a_reason(log, anchor):
    log.anchor_path.unlink()
    if anchor == "directory":
        log.anchor_path.mkdir()
    else:
        log.anchor_path.write_bytes(anchor.encode("latin-1"))
    result = AuditLog(log.path, read_only=True).verify()
    assert not result.ok and result.records == 6
    assert str(log.anchor_path) in result.problem


@pytest.mark.parametrize("anchor", ["[1, 2]", '{"seq": null}', "directory"])
def test_a_writer_refuses_to_append_past_a_bad_anchor_before_committing(log, anchor):
    log.anchor_path.unlink()
    if anchor == "directory":
        log.anchor_path.mkdir()
    else:
        log.anchor_path.write_text(anchor)
    with pytest.raises(audit_log.AuditError, match="anchor file"):
        log.append("x", "after the anchor was damaged", actor="t")
    assert len(log.records()) == 6  # refused, not committed and then failed


def test_cli_verify_reports_a_bad_anchor_as_a_failure_not_a_traceback(log, aidc_cli):
    log.anchor_path.write_text('{"seq": null}')
    out = aidc_cli("audit", "verify", "--db", str(log.path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "FAILED" in out.stdout and "anchor file" in out.stdout


def test_a_log_with_a_payload_edited_into_junk_still_opens_and_verify_names_the_record(log):
    _sql(log, "DROP INDEX IF EXISTS audit_kind_run")  # what an editor must do first
    _sql(log, "UPDATE audit SET payload = 'not json' WHERE seq = 3")
    reopened = AuditLog(log.path)
    result = reopened.verify()
    assert not result.ok and result.first_bad_seq == 3
    reopened.close()
