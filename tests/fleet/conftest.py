"""Fixtures for fleet health: a lab-like audit log whose faulty node was quarantined and then
recertified and released (the drop and the recovery), signed with the lab's keyring; a PKI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aidc.audit.log import AuditLog, configure_signing
from aidc.failover.controller import FailoverController
from aidc.failover.scheduler import LabScheduler
from aidc.kms.local import LocalKeyring
from aidc.spec import load_stack
from aidc.store import Store
from tests.report.lab_log import build_lab_audit_log

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runbook"))
from certs import CA  # noqa: E402

VICTIM = "gpu-1"  # lab_log's: XID 79 on its GPU 0, quarantined by the failover controller


@pytest.fixture(scope="session")
def fleet_lab(tmp_path_factory):
    """(lab dir, audit db, {moment: time}) of a lab run with a fault and its repair. The log is
    written by the real stages (burn-in judge, health agent, failover controller) and signed
    with a lab keyring from the repair on."""
    base = tmp_path_factory.mktemp("fleet")
    db = build_lab_audit_log(base)
    lab_dir = base / "lab"
    spec = load_stack("lab")
    keyring = LocalKeyring.create(lab_dir / "keyring", spec.kms.key_id)
    configure_signing(db, keyring.path, keyring.key_id)
    with AuditLog(db) as audit:
        audit.use_signer(keyring)
        moments = {"before_fault": audit.records(kind="lab.inject")[0].ts - 1e-3,
                   "quarantined": audit.records(kind="failover.action", node=VICTIM)[-1].ts}
        # The repair: the GPU reseated, the node burnt in again, an operator releases it.
        again = audit.records(kind="burnin.certificate", node=VICTIM)[-1]
        audit.append("burnin.certificate", "passed burn-in", actor="burnin", node=VICTIM, payload=again.payload)
        store = Store(base / "state.db")
        try:
            FailoverController(spec, store, audit, LabScheduler(lab_dir), dry_run=False).release(
                VICTIM, "GPU reseated and recertified", actor="user:ops")
        finally:
            store.close()
        moments["released"] = audit.records(kind="failover.release", node=VICTIM)[-1].ts
    keyring.close()
    return lab_dir, db, moments


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-pki")
    ca = CA.create(root, "aidc-cluster-ca")
    return {"ca": ca, "server": ca.issue(root, "aidc-controller", server=True),
            **{name: ca.issue(root, name, server=False) for name in ("viewer-bot", "no-role-bot", "gpu-3")}}
