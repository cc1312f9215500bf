"""The audit log's contract on every state backend (SQLite with its anchor file, and a real
PostgreSQL with the anchor as a row): one hash chain, tampering named at the record, truncation
caught by the anchor, signatures required of everything after signing began, a missing anchor
refused until a person re-anchors. Reopening is a restart."""

from __future__ import annotations

import json
import sqlite3

import pytest

from aidc.audit.log import ANCHOR_DOMAIN, GENESIS, record_hash, signed_message
from aidc.errors import AuditError
from aidc.kms.local import LocalKeyring
from aidc.state import open_audit_log


class Site:
    """An audit log on one backend, and the hands of someone who can write its storage directly."""

    def __init__(self, backend: str, location: str, state_dir):
        self.backend, self.location, self.state_dir = backend, location, state_dir

    def open(self, **kw):
        return open_audit_log(self.backend, self.location, state_dir=self.state_dir, **kw)

    def sql(self, statement: str, *args) -> list[tuple]:
        """Run SQL on the storage itself, past aidc (and past PostgreSQL's append-only trigger)."""
        if self.backend == "sqlite":
            db = sqlite3.connect(self.location)
            rows = db.execute(statement, args).fetchall()
            db.commit()
            db.close()
            return rows
        import psycopg

        with psycopg.connect(self.location, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")  # triggers off: a superuser's tamper
            cur = conn.execute(statement.replace("?", "%s"), args or None)
            return cur.fetchall() if cur.description else []

    def set_anchor(self, seq: int, digest: str, signature: dict | None = None) -> None:
        """Write the anchor as a writer would, without the signing key."""
        if self.backend == "sqlite":
            doc = {"seq": seq, "hash": digest, **({"signature": signature} if signature else {})}
            with open(self.location + ".anchor", "w") as f:
                f.write(json.dumps(doc))
        else:
            self.sql("UPDATE audit_anchor SET seq = ?, hash = ?, signature = ?", seq, digest,
                     json.dumps(signature) if signature else None)

    def anchor(self) -> dict:
        if self.backend == "sqlite":
            with open(self.location + ".anchor") as f:
                return json.load(f)
        seq, digest, signature = self.sql("SELECT seq, hash, signature FROM audit_anchor")[0]
        return {"seq": seq, "hash": digest, **({"signature": json.loads(signature)} if signature else {})}

    def remove_anchor(self) -> None:
        if self.backend == "sqlite":
            import os

            os.remove(self.location + ".anchor")
        else:
            self.sql("DELETE FROM audit_anchor")


@pytest.fixture
def site(state_location, tmp_path):
    backend, location = state_location
    if backend == "sqlite":
        location = str(tmp_path / "audit.db")
    return Site(backend, location, tmp_path)


def _fill(site, n: int = 6, **kw):
    with site.open(**kw) as log:
        for i in range(n):
            log.append("burnin.certificate", f"record {i + 1}", actor="test", node=f"n{i % 2}",
                       payload={"i": i, "run_id": i % 3})


def test_records_come_back_as_written_and_the_chain_verifies_after_a_restart(site):
    _fill(site)
    with site.open(read_only=True) as log:
        result = log.verify()
        assert result.ok and result.records == 6 and not result.notes, result
        records = log.records()
        assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
        assert records[0].prev_hash == GENESIS and records[1].prev_hash == records[0].hash
        assert records[2].hash == record_hash(records[1].hash, 3, records[2].ts, "test", "n0", "burnin.certificate",
                                              "record 3", json.dumps({"i": 2, "run_id": 2}, sort_keys=True))
        assert [r.seq for r in log.records(node="n1")] == [2, 4, 6]
        assert [r.seq for r in log.find("burnin.certificate", run_id=1)] == [2, 5]
        assert log.find("burnin.certificate", run_id="1") == []  # a value is matched with its type
        assert log.latest_stored("burnin.certificate", "n0")["seq"] == 5
    assert site.anchor()["seq"] == 6


def test_two_writers_appending_at_once_keep_one_chain(site):
    import threading

    writers = [site.open(), site.open()]  # two connections, as two controller replicas hold
    try:
        threads = [threading.Thread(target=lambda w=w, n=n: [w.append("x", f"{n}.{i}", actor=n) for i in range(15)])
                   for n, w in zip("ab", writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        result = writers[0].verify()
        assert result.ok and result.records == 30, result
        assert site.anchor()["seq"] == 30  # the head, whichever writer finished last
    finally:
        for w in writers:
            w.close()


@pytest.mark.parametrize("tamper, bad_seq", [
    ("UPDATE audit SET reason = 'nothing happened' WHERE seq = 4", 4),
    ("UPDATE audit SET payload = '{\"i\": 99}' WHERE seq = 2", 2),
    ("DELETE FROM audit WHERE seq = 3", 3),
])
def test_an_edited_or_deleted_record_is_named(site, tamper, bad_seq):
    _fill(site)
    site.sql(tamper)
    with site.open(read_only=True) as log:
        result = log.verify()
    assert not result.ok and result.first_bad_seq == bad_seq, result


def test_a_cut_tail_is_caught_by_the_anchor(site):
    _fill(site)
    site.sql("DELETE FROM audit WHERE seq >= 5")
    with site.open(read_only=True) as log:
        result = log.verify()
    assert not result.ok and "truncated" in result.problem and result.first_bad_seq == 5


def test_a_missing_anchor_stops_writers_until_a_person_reanchors(site):
    _fill(site, 3)
    site.remove_anchor()
    with site.open() as log:
        assert not log.verify().ok
        with pytest.raises(AuditError, match="re-anchor"):
            log.append("x", "after the cut", actor="t")
        record = log.reanchor("anchor lost in the move", actor="person")
        assert record.seq == 4 and record.payload["previous_anchor"] is None
        log.append("x", "after the re-anchor", actor="t")
        result = log.verify()
    assert result.ok and result.records == 5 and any("re-anchored" in n for n in result.notes)


def test_a_signed_log_verifies_with_its_key_and_no_keyless_rewrite_passes(site, tmp_path):
    keyring = LocalKeyring.create(tmp_path / "keyring", "audit-test")
    pem = keyring.public_key_pem()
    _fill(site, 4, signer=keyring)
    assert "signature" in site.anchor()
    with site.open(read_only=True) as log:
        assert log.verify(public_key_pem=pem).ok
    # Without the key: rewrite record 4 and re-chain it, and move the head to match it.
    seq, ts, actor, node, kind, _reason, payload, prev = site.sql(
        "SELECT seq, ts, actor, node, kind, reason, payload, prev_hash FROM audit WHERE seq = 4")[0]
    forged = record_hash(prev, seq, ts, actor, node, kind, "nothing happened", payload)
    site.sql("UPDATE audit SET reason = 'nothing happened', hash = ? WHERE seq = 4", forged)
    site.set_anchor(4, forged, site.anchor()["signature"])
    with site.open(read_only=True) as log:
        assert log.verify().ok  # the chain alone is consistent again ...
        result = log.verify(public_key_pem=pem)
    assert not result.ok and result.first_bad_seq == 4  # ... but neither the head nor the record is signed


def test_a_signed_head_moved_back_with_its_tail_cut_is_caught_by_the_record_signatures(site, tmp_path):
    keyring = LocalKeyring.create(tmp_path / "keyring", "audit-test")
    _fill(site, 4, signer=keyring)
    third = site.sql("SELECT hash FROM audit WHERE seq = 3")[0][0]
    site.sql("DELETE FROM audit WHERE seq = 4")
    site.set_anchor(3, third, site.anchor()["signature"])  # record 4's head signature on record 3
    with site.open(read_only=True) as log:
        result = log.verify(public_key_pem=keyring.public_key_pem())
    assert not result.ok and "anchor's signature" in result.problem


def test_a_signed_log_refuses_a_writer_without_the_key(site, tmp_path):
    keyring = LocalKeyring.create(tmp_path / "keyring", "audit-test")
    _fill(site, 2, signer=keyring)
    with site.open() as log, pytest.raises(AuditError, match="signing key"):
        log.append("x", "unsigned", actor="t")


def test_the_signed_anchor_names_the_head_in_the_anchor_domain(site, tmp_path):
    import base64

    from aidc.kms import verify_with_pem

    keyring = LocalKeyring.create(tmp_path / "keyring", "audit-test")
    _fill(site, 3, signer=keyring)
    anchor = site.anchor()
    assert anchor["seq"] == 3
    assert verify_with_pem(keyring.public_key_pem(), signed_message(ANCHOR_DOMAIN, 3, anchor["hash"]),
                           base64.b64decode(anchor["signature"]["value"]))


def test_postgres_refuses_updates_and_deletes_of_records(postgres_database, tmp_path):
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")
    _fill(Site("postgres", postgres_database, tmp_path), 2)
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        for statement in ("UPDATE audit SET reason = 'x' WHERE seq = 1", "DELETE FROM audit WHERE seq = 2"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)


def test_the_report_reads_the_log_on_either_backend(site, tmp_path):
    import stat

    from aidc.audit.report import write_report

    _fill(site, 3)
    with site.open(read_only=True) as log:
        html_path, json_path, verified = write_report(log, tmp_path / "report")
    assert verified.ok and verified.records == 3
    assert len(json.loads(json_path.read_text())["records"]) == 3
    assert not stat.S_IMODE(json_path.stat().st_mode) & 0o077  # the records stay private


def test_cli_verify_on_postgres_names_the_edited_record(postgres_database, tmp_path, aidc_cli):
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")
    site = Site("postgres", postgres_database, tmp_path)
    _fill(site, 3)
    ok = aidc_cli("audit", "verify", "--dsn", postgres_database, "--db", str(tmp_path / "audit.db"), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["records"] == 3, ok.stderr
    site.sql("UPDATE audit SET reason = 'nothing happened' WHERE seq = 2")
    bad = aidc_cli("audit", "verify", "--dsn", postgres_database, "--db", str(tmp_path / "audit.db"))
    assert bad.returncode == 1 and "FAILED at record 2" in bad.stdout and "Traceback" not in bad.stderr
