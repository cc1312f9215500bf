"""Recertification on the lab: a runbook's burn-in step burns in its one (quarantined) node through
the lab launcher, judged against the stored baseline of its GPU model, and the node goes back to
service only on a passing certificate; a failing one keeps it out with its reasons."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from aidc.audit import AuditLog
from aidc.failover.scheduler import LabScheduler
from aidc.installation import record
from aidc.spec import load_stack

RECERTIFY = """
name: recertify
title: Recertify
summary: Take the node out, burn it in alone, give it back only when it certifies.
trigger: {alerts: [{alertname: Recertify}]}
steps:
  - {id: out, kind: quarantine, reason: "fault on ${node}"}
  - {id: burn-in, kind: burnin, tests: [gemm, memcpy, allreduce], timeout_s: 400}
  - {id: back, kind: release, reason: "recertified"}
on_failure:
  - {id: tell, kind: notify, message: "recertification of ${node} failed"}
"""
LOW = {"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"gemm_fp32_tflops": 1e-6, "memcpy_gbps": 1e-6}}}}


def _stack(directory):
    spec = {"name": "labrecert", "device_backend": "sim", "scheduler": "lab",
            "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1}],
            "policy": {"max_unavailable": 1, "runbook_auto_approve": ["quarantine", "release", "burnin"],
                       "burnin": {"fleet_tolerance": 0.95, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
                                  "allreduce_min_bytes": 4096, "allreduce_max_bytes": 16384, "train_steps": 10,
                                  "min_busbw_fraction": 0.25, "storage_bytes": 1 << 20, "storage_files": 10}}}
    path = directory / "Pulumi.labrecert.yaml"
    path.write_text(yaml.safe_dump({"config": {"aidc:cluster": spec}}))
    return path


def _run(aidc_cli, tmp_path, node, *, inject_sdc=False):
    from aidc.burnin.runner import lab_node_dirs

    stack = _stack(tmp_path)
    spec = load_stack(str(stack))
    lab = tmp_path / "lab"
    dirs = lab_node_dirs(spec, lab)
    record(lab, spec, str(stack))
    (lab / "burnin-baselines.json").write_text(json.dumps(LOW))
    if inject_sdc:
        out = aidc_cli("device", "inject", str(dirs[node]), "sdc", "--gpu", "0")
        assert out.returncode == 0, out.stderr
    rb_dir = tmp_path / "runbooks"
    rb_dir.mkdir()
    (rb_dir / "recertify.yaml").write_text(textwrap.dedent(RECERTIFY))
    out = aidc_cli("runbook", "run", "recertify", "--node", node, "--stack", str(stack), "--runbooks", str(rb_dir),
                   "--state-db", str(tmp_path / "state.db"), "--audit-db", str(tmp_path / "audit.db"),
                   "--lab-dir", str(lab), "--json", timeout=600)
    return out, lab, AuditLog(tmp_path / "audit.db")


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
