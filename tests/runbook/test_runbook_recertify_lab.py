"""Recertification on the lab: a runbook's burn-in step burns in its one (quarantined) node through
the lab launcher, judged against the stored baseline of its GPU model, and the node goes back to
service only on a passing certificate; a failing one keeps it out with its reasons."""

from __future__ import annotations

import json

import pytest

from aidc.audit import AuditLog
from aidc.failover.scheduler import LabScheduler
from tests.runbook.recertify_case import LOW, prepare, write_stack

def _run(aidc_cli, tmp_path, node, *, inject_sdc=False):
    lab = tmp_path / "lab"
    args = prepare(aidc_cli, tmp_path, write_stack(tmp_path, "labrecert", "lab"), lab, node,
                   inject_sdc_gpu=0 if inject_sdc else None)
    return aidc_cli("runbook", "run", *args, timeout=600), lab, AuditLog(tmp_path / "audit.db")


@pytest.mark.slow
def test_a_quarantined_lab_node_is_recertified_alone_and_released(aidc_cli, tmp_path):
    out, lab, audit = _run(aidc_cli, tmp_path, "gpu-1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = {s["step_id"]: s for s in json.loads(out.stdout)["steps"]}
    assert [steps[s]["status"] for s in ("out", "burn-in", "back")] == ["done"] * 3
    assert steps["burn-in"]["result"]["verdict"] == "pass" and steps["burn-in"]["result"]["launcher"] == "lab"
    assert LabScheduler(lab).state("gpu-1") == "in_service"
    certs = audit.records(kind="burnin.certificate")
    assert [(c.node, c.payload["verdict"]) for c in certs] == [("gpu-1", "pass")]  # this node alone
    assert certs[0].payload["baseline"] == LOW["models"]["SIM"]["metrics"]


@pytest.mark.slow
def test_a_failing_lab_recertification_keeps_the_node_out_with_its_reasons(aidc_cli, tmp_path):
    out, lab, audit = _run(aidc_cli, tmp_path, "gpu-2", inject_sdc=True)
    assert out.returncode == 1
    steps = {s["step_id"]: s for s in json.loads(out.stdout)["steps"]}
    assert steps["burn-in"]["status"] == "failed" and steps["back"]["status"] == "pending"
    assert steps["burn-in"]["result"]["verdict"] == "fail" and 0 in steps["burn-in"]["result"]["failed_gpus"]
    assert LabScheduler(lab).state("gpu-2") == "quarantined"
    step_records = [r for r in audit.records(kind="runbook.step") if r.payload.get("step") == "burn-in"]
    assert step_records and step_records[-1].payload["result"]["reasons"] == steps["burn-in"]["result"]["reasons"]
