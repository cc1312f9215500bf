"""Every verifier checks the installation's signatures.

Specification: on a log whose installation (aidc.installation: `installation.json` beside
the log) has a signing key, every verification uses that public key: the agent's periodic
check (`aidc_audit_verify_ok`), `aidc audit verify` with and without `--public-key`, `aidc
audit report` and the library's `verify()`. Each tamper below is one an attacker without the
private key can make so that the hash chain and the anchor hold (the chain-only check passes:
asserted); each one fails every verifier.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pytest

from aidc.audit import log as audit_log
from aidc.audit.log import AuditLog
from aidc.device import sim
from aidc.device.sim import SimBackend
from aidc.health.agent import HealthAgent
from aidc.health.exporter import render
from aidc.installation import record
from aidc.kms.local import LocalKeyring
from aidc.spec import load_stack
from aidc.store import Store
from tests.health.conftest import metric_value

RECORDS = 8
COLUMNS = "ts, actor, node, kind, reason, payload"


@pytest.fixture
def site(tmp_path):
    """Eight signed records in an installation whose record names the signing key (as `aidc lab
    run` sets it up); the public key also in a file, for `--public-key`."""
    keyring = LocalKeyring.create(tmp_path / "keyring", "audit-test")
    db = tmp_path / "audit.db"
    audit_log.configure_signing(db, keyring.path, keyring.key_id)
    with AuditLog(db) as writer:
        for i in range(RECORDS):
            writer.append("burnin.certificate", f"record {i + 1}", actor="test", node=f"n{i % 2}", payload={"i": i})
    record(tmp_path, load_stack("lab"), "lab", public_key_pem=keyring.public_key_pem(), key_id=keyring.key_id)
    key_file = tmp_path / "signing.pem"
    key_file.write_text(keyring.public_key_pem())
    return {"dir": tmp_path, "db": db, "key_file": key_file}


# --- keyless tampers: rows rewritten as a valid chain, the anchor moved to match ------------------
def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM audit ORDER BY seq").fetchall()


def signatures(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT seq, signature FROM audit_signature").fetchall())


def rewrite(site, new_rows: list[tuple], new_signatures: dict[int, str] | None = None,
            anchor_signature: str = "keep") -> None:
    """Replace the log by `new_rows` (seq 1..n, each hash recomputed) and the anchor by one
    naming its head: its old signature kept ("keep"), dropped ("drop"), or this value."""
    db = site["db"]
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit")
        prev = audit_log.GENESIS
        for seq, (ts, actor, node, kind, reason, payload) in enumerate(new_rows, 1):
            digest = audit_log.record_hash(prev, seq, ts, actor, node, kind, reason, payload)
            conn.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (seq, ts, actor, node, kind, reason, payload, prev, digest))
            prev = digest
        if new_signatures is not None:
            conn.execute("DELETE FROM audit_signature")
            conn.executemany("INSERT INTO audit_signature(seq, key_id, key_version, signature) "
                             "VALUES (?, 'audit-test', 1, ?)", new_signatures.items())
    anchor_path = db.with_name(db.name + ".anchor")
    anchor = json.loads(anchor_path.read_text())
    anchor.update(seq=len(new_rows), hash=prev)
    if anchor_signature == "drop":
        anchor.pop("signature", None)
    elif anchor_signature != "keep":
        anchor["signature"] = {"key_id": "audit-test", "key_version": 1, "value": anchor_signature}
    anchor_path.write_text(json.dumps(anchor))


def edit(site, seq: int, **fields) -> list[tuple]:
    out = rows(site["db"])
    names = COLUMNS.split(", ")
    out[seq - 1] = tuple(fields.get(name, value) for name, value in zip(names, out[seq - 1]))
    return out


def edited_reason(site):
    rewrite(site, edit(site, 4, reason="nothing happened"))


def edited_payload_signatures_dropped(site):
    rewrite(site, edit(site, 2, payload='{"i": 99}'), new_signatures={}, anchor_signature="drop")


def inserted_middle(site):
    out = rows(site["db"])
    out.insert(3, (out[2][0], "attacker", None, "burnin.certificate", "forged", "{}"))
    rewrite(site, out)


def deleted_middle(site):
    out = rows(site["db"])
    del out[4]
    rewrite(site, out)


def reordered(site):
    out = rows(site["db"])
    out[1], out[5] = out[5], out[1]
    rewrite(site, out)


def forged_tail(site):
    out = rows(site["db"])
    rewrite(site, out + [(out[-1][0] + 1, "attacker", None, "burnin.certificate", "forged", "{}")],
            anchor_signature="drop")


def truncated_tail(site):
    rewrite(site, rows(site["db"])[:5], anchor_signature="drop")


def stripped_signature(site):
    with sqlite3.connect(site["db"]) as conn:
        conn.execute("DELETE FROM audit_signature WHERE seq = 6")


def swapped_signatures(site):
    sigs = signatures(site["db"])
    sigs[3], sigs[7] = sigs[7], sigs[3]
    rewrite(site, rows(site["db"]), new_signatures=sigs)


def all_signatures_and_sidecar_removed(site):
    rewrite(site, rows(site["db"]), new_signatures={}, anchor_signature="drop")
    audit_log.signing_config_path(site["db"]).unlink()


def resigned_with_an_attackers_key(site):
    # A key of their own, the sidecar pointed at it: every signature valid, for the wrong key.
    mine = LocalKeyring.create(site["dir"] / "mine", "audit-test")
    rewrite(site, edit(site, 1, reason="nothing happened"))
    with sqlite3.connect(site["db"]) as conn:
        hashes = [h for (h,) in conn.execute("SELECT hash FROM audit ORDER BY seq")]
    sign = lambda domain, seq, digest: base64.b64encode(  # noqa: E731
        mine.sign(audit_log.signed_message(domain, seq, digest))).decode()
    rewrite(site, rows(site["db"]), {seq: sign(audit_log.RECORD_DOMAIN, seq, h) for seq, h in enumerate(hashes, 1)},
            anchor_signature=sign(audit_log.ANCHOR_DOMAIN, len(hashes), hashes[-1]))
    audit_log.configure_signing(site["db"], mine.path, mine.key_id)


TAMPERS = [edited_reason, edited_payload_signatures_dropped, inserted_middle, deleted_middle, reordered,
           forged_tail, truncated_tail, stripped_signature, swapped_signatures, all_signatures_and_sidecar_removed,
           resigned_with_an_attackers_key]


# --- the verifiers -----------------------------------------------------------------------------
def verdicts(site, aidc_cli) -> dict[str, bool]:
    """Whether each verifier accepts the log as it stands."""
    db, out = site["db"], site["dir"] / "report"
    with AuditLog(db, read_only=True) as log:
        found = {"library verify()": log.verify().ok}
    plain = aidc_cli("audit", "verify", "--db", str(db))
    keyed = aidc_cli("audit", "verify", "--db", str(db), "--public-key", str(site["key_file"]))
    report = aidc_cli("audit", "report", "--db", str(db), "--out", str(out))
    assert {plain.returncode, keyed.returncode} <= {0, 1} and report.returncode == 0, plain.stderr + keyed.stderr
    found.update({"audit verify": plain.returncode == 0, "audit verify --public-key": keyed.returncode == 0,
                  "audit report": json.loads((out / "report.json").read_text())["verification"]["ok"]})
    # Last: the agent's writer catches a lagging anchor up on close, which no tamper here leaves.
    node_dir = sim.create_node(site["dir"] / "n1", "n1", gpus=1)
    store, audit = Store(site["dir"] / "store.db"), AuditLog(db)
    agent = HealthAgent("n1", SimBackend(node_dir), None, store, audit)
    try:
        agent.node_checks(now=0)
        found["agent aidc_audit_verify_ok"] = metric_value(render(agent.metrics.registry).decode(),
                                                           "aidc_audit_verify_ok", Hostname="n1") == 1
    finally:
        agent.close()
        agent.dev.close()
        store.close()
        audit.close()
    return found


def chain_only(db: Path) -> bool:
    with AuditLog(db, read_only=True) as log:
        return log._verify(None).ok


def test_a_genuine_signed_log_passes_every_verifier(site, aidc_cli):
    assert verdicts(site, aidc_cli) == dict.fromkeys(
        ["library verify()", "audit verify", "audit verify --public-key", "audit report",
         "agent aidc_audit_verify_ok"], True)


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_a_keyless_tamper_fails_every_verifier(site, aidc_cli, tamper):
    tamper(site)
    assert chain_only(site["db"]), "a keyless tamper: the chain and anchor alone cannot tell"
    found = verdicts(site, aidc_cli)
    assert found == dict.fromkeys(found, False)


def test_a_record_others_can_write_fails_verification(site):
    (site["dir"] / "installation.json").chmod(0o666)
    with AuditLog(site["db"], read_only=True) as log:
        result = log.verify()
    assert not result.ok and "is not trusted" in result.problem


def test_a_public_key_other_than_the_installations_does_not_pass(site, aidc_cli):
    other = site["dir"] / "other.pem"
    other.write_text(LocalKeyring.create(site["dir"] / "other", "other").public_key_pem())
    out = aidc_cli("audit", "verify", "--db", str(site["db"]), "--public-key", str(other))
    assert out.returncode == 1 and "does not verify with this public key" in out.stdout
