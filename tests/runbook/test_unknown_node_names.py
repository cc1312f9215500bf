"""Alerts naming a node that is not one of the cluster's: refused, audited, aggregated.

Specification: an alert whose node label is not a node of this cluster (a typo, a removed
node, a hostile `../x`) starts and plans nothing (outcome `unknown_node`); the refusal is
audited at entry `runbook`, the first at once and the rest of a window as one summary with
the count, so a flood of such alerts cannot grow the audit log without bound.
"""

from __future__ import annotations

from aidc.nodenames import AUDIT_KIND, RefusalLog
from aidc.spec import Policy
from runbook_fakes import QUARANTINE_AND_NOTIFY, alert

HOSTILE = ["gpu-9", "../x", "/etc/passwd", "gpu-1\x00", "gpu-\u0430", "x" * 300]


class FrozenClock:
    def __call__(self) -> float:
        return 0.0


def test_an_alert_for_a_name_that_is_not_a_node_starts_nothing_and_is_audited(make_engine, fakes):
    for policy in (Policy(), Policy(dry_run=True)):
        engine = make_engine(QUARANTINE_AND_NOTIFY, policy=policy)
        outcomes = [engine.submit_alert(alert("NodeBroken", name, fingerprint=f"fp-{i}")).outcome
                    for i, name in enumerate(HOSTILE)]
        assert outcomes == ["unknown_node"] * len(HOSTILE)
        assert engine.state.runs() == [] and fakes.scheduler.calls == []
        engine.refusals.flush()
    refused = [r.payload for r in engine.audit.records(kind=AUDIT_KIND)]
    assert {p["where"] for p in refused} == {"runbook"}
    assert sum(p["refused"] for p in refused) == 2 * len(HOSTILE)


def test_a_flood_of_alerts_for_unknown_names_gives_two_audit_records_per_window(make_engine, fakes):
    engine = make_engine(QUARANTINE_AND_NOTIFY)
    engine.refusals = RefusalLog(engine.audit, "test", lock=engine._audit_lock, clock=FrozenClock())
    for i in range(300):
        assert engine.submit_alert(alert("NodeBroken", f"ghost-{i}", fingerprint=f"fp-{i}")).outcome == "unknown_node"
    engine.refusals.flush()
    assert [r.payload["refused"] for r in engine.audit.records(kind=AUDIT_KIND)] == [1, 299]
    assert len(engine.audit.records()) == 2
    # A node of the cluster is still served.
    assert engine.submit_alert(alert("NodeBroken", "gpu-1")).outcome == "started"


def test_running_a_runbook_by_hand_on_a_name_that_is_not_a_node_is_one_error_line_and_audited(aidc_cli, tmp_path):
    from aidc.audit.log import AuditLog
    from runbook_fakes import ROOT, write_runbook

    (tmp_path / "rb").mkdir()
    write_runbook(tmp_path / "rb", QUARANTINE_AND_NOTIFY)
    for name in ("../x", "gpu-\u0430"):
        out = aidc_cli("runbook", "run", "take-out", "--node", name, "--stack", str(ROOT / "Pulumi.lab.yaml"),
                       "--runbooks", str(tmp_path / "rb"), "--lab-dir", str(tmp_path / "lab"),
                       "--state-db", str(tmp_path / "state.db"), "--audit-db", str(tmp_path / "audit.db"))
        assert out.returncode != 0 and out.stderr.startswith("aidc: error: ") and out.stderr.count("\n") == 1
    with AuditLog(tmp_path / "audit.db") as audit:
        refused = [(r.payload["where"], r.payload["name"]) for r in audit.records(kind=AUDIT_KIND)]
    assert refused == [("cli", ascii("../x")), ("cli", ascii("gpu-\u0430"))]
    assert not (tmp_path / "x").exists()
