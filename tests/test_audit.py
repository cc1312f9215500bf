"""The audit log: append-only, hash-chained, and every kind of tampering is named."""

import sqlite3

import pytest

from aidc.audit import AuditLog


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


def test_cli_verify_exits_non_zero_and_names_the_record(aidc_cli, log):
    assert aidc_cli("audit", "verify", "--db", str(log.path)).returncode == 0
    _sql(log, "UPDATE audit SET actor = 'mallory' WHERE seq = 1")
    out = aidc_cli("audit", "verify", "--db", str(log.path))
    assert out.returncode == 1 and "record 1" in out.stdout
