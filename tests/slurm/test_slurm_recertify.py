"""Recertification through a real Slurm: fault -> quarantine (drain) -> burn-in of the drained node
alone, inside a maintenance reservation only aidc may use -> release; a failing recertification
keeps the node drained with aidc's own reason naming why."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from aidc.audit import AuditLog
from aidc.installation import record
from aidc.spec import load_stack

from .slurm_helpers import reason

RECERTIFY = """
name: recertify
title: Recertify
summary: Take the node out, burn it in alone, give it back only when it certifies.
trigger: {alerts: [{alertname: Recertify}]}
guards: [{guard: node_known}, {guard: blast_radius}]
steps:
  - {id: out, kind: quarantine, reason: "fault on ${node}"}
  - {id: burn-in, kind: burnin, tests: [gemm, memcpy], timeout_s: 400}
  - {id: back, kind: release, reason: "recertified"}
on_failure:
  - {id: tell, kind: notify, message: "recertification of ${node} failed"}
"""
# Below anything the simulated GPUs measure: the verdicts under test are the SDC check's and the
# Slurm path's, not timing (specified in tests/burnin/test_baselines.py).
LOW = {"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"gemm_fp32_tflops": 1e-6, "memcpy_gbps": 1e-6}}}}


def _stack(local_slurm, directory):
    spec = {"name": "recert", "device_backend": "sim", "scheduler": "slurm",
            "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1}],
            "slurm": {"conf": str(local_slurm.conf), "command_timeout_s": 5.0,
                      "burnin": {"partition": local_slurm.partition}},
            "policy": {"max_unavailable": 1, "runbook_auto_approve": ["quarantine", "release", "burnin"],
                       "burnin": {"fleet_tolerance": 0.95, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
                                  "allreduce_min_bytes": 4096, "allreduce_max_bytes": 16384, "train_steps": 10,
                                  "min_busbw_fraction": 0.25, "storage_bytes": 1 << 20, "storage_files": 10}}}
    path = directory / "Pulumi.recert.yaml"
    path.write_text(yaml.safe_dump({"config": {"aidc:cluster": spec}}))
    return path


def _run(aidc_cli, tmp_path, local_slurm, node, *, inject_sdc=False, baselines=LOW):
    stack = _stack(local_slurm, tmp_path)
    rb_dir = tmp_path / "runbooks"
    rb_dir.mkdir(exist_ok=True)
    (rb_dir / "recertify.yaml").write_text(textwrap.dedent(RECERTIFY))
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    spec = load_stack(str(stack))
    record(site, spec, str(stack))
    if baselines is not None:
        (site / "burnin-baselines.json").write_text(json.dumps(baselines))
    if inject_sdc:
        from aidc.burnin.runner import lab_node_dirs

        out = aidc_cli("device", "inject", str(lab_node_dirs(spec, site)[node]), "sdc", "--gpu", "1")
        assert out.returncode == 0, out.stderr
    out = aidc_cli("runbook", "run", "recertify", "--node", node, "--stack", str(stack), "--runbooks", str(rb_dir),
                   "--state-db", str(tmp_path / "state.db"), "--audit-db", str(tmp_path / "audit.db"),
                   "--lab-dir", str(site), "--json", timeout=600)
    return out, AuditLog(tmp_path / "audit.db")


def _reservations(local_slurm) -> str:
    return local_slurm.run("scontrol", "show", "reservation", "-o", check=False).stdout.strip()


def _slurm_commands(audit) -> list[str]:
    return [" ".join(a for a in r.payload["argv"][1:4]) for r in audit.records(kind="slurm.command")]


@pytest.mark.slow
def test_a_drained_node_is_recertified_alone_inside_aidcs_reservation_then_released(aidc_cli, local_slurm, tmp_path):
    out, audit = _run(aidc_cli, tmp_path, local_slurm, "gpu-2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = json.loads(out.stdout)
    assert [(s["step_id"], s["status"]) for s in run["steps"]] == [("out", "done"), ("burn-in", "done"),
                                                                  ("back", "done")]
    burnin = run["steps"][1]["result"]
    assert burnin["verdict"] == "pass" and burnin["launcher"] == "slurm" and burnin["reservation"] == "aidc-recert-gpu-2"
    # The job ran in the reservation, on the one node, and nothing of aidc's is left behind.
    acct = local_slurm.run("sacct", "-c", "-n", "-P", "-X", "-j", burnin["job_id"], "-o",
                           "JobName,NodeList,Reservation,State").stdout.split()
    assert acct == ["aidc-burnin|gpu-2|aidc-recert-gpu-2|COMPLETED"]
    assert _reservations(local_slurm) in ("", "No reservations in the system")
    assert local_slurm.node_states()["gpu-2"].startswith("idle") and reason(local_slurm, "gpu-2") == "none"
    assert _slurm_commands(audit) == ["update NodeName=gpu-2 State=DRAIN", "create reservation ReservationName=aidc-recert-gpu-2",
                                      "update NodeName=gpu-2 State=RESUME", "update NodeName=gpu-2 State=DRAIN",
                                      "delete ReservationName=aidc-recert-gpu-2", "update NodeName=gpu-2 State=RESUME"]
    certs = audit.records(kind="burnin.certificate")
    assert [(c.node, c.payload["verdict"]) for c in certs] == [("gpu-2", "pass")]
    assert audit.verify().ok


@pytest.mark.slow
def test_a_failing_recertification_keeps_the_node_drained_with_its_reasons(aidc_cli, local_slurm, tmp_path):
    from aidc.failover.slurm import SlurmScheduler

    out, audit = _run(aidc_cli, tmp_path, local_slurm, "gpu-1", inject_sdc=True)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    run = json.loads(out.stdout)
    steps = {s["step_id"]: s for s in run["steps"]}
    assert steps["burn-in"]["status"] == "failed" and steps["back"]["status"] == "pending"  # never released
    result = steps["burn-in"]["result"]
    # Two GPUs with no stored known answer for this size cannot out-vote each other: both are named.
    assert result["verdict"] == "fail" and 1 in result["failed_gpus"] and result["reasons"]
    sched = SlurmScheduler(conf=str(local_slurm.conf))
    status = sched.node("gpu-1")
    assert status.drained and status.drained_by_aidc  # still aidc's drain: a later runbook may resume it
    assert status.reason.startswith("aidc: recertification failed: ")
    assert _reservations(local_slurm) in ("", "No reservations in the system")
    certs = audit.records(kind="burnin.certificate")
    assert [(c.node, c.payload["verdict"]) for c in certs] == [("gpu-1", "fail")]


def test_a_node_an_operator_drained_is_not_resumed_for_recertification(aidc_cli, local_slurm, tmp_path):
    local_slurm.run("scontrol", "update", "NodeName=gpu-0", "State=DRAIN", "Reason=firmware update")
    out, audit = _run(aidc_cli, tmp_path, local_slurm, "gpu-0")
    assert out.returncode == 1
    steps = {s["step_id"]: s for s in json.loads(out.stdout)["steps"]}
    assert steps["burn-in"]["status"] == "failed" and "not by aidc" in steps["burn-in"]["result"]["error"]
    assert reason(local_slurm, "gpu-0") == "firmware update" and local_slurm.node_states()["gpu-0"] == "drained"
    assert _reservations(local_slurm) in ("", "No reservations in the system")
    assert audit.records(kind="burnin.certificate") == []


def test_without_a_stored_baseline_a_lone_node_is_not_recertified(aidc_cli, local_slurm, tmp_path):
    out, audit = _run(aidc_cli, tmp_path, local_slurm, "gpu-3", baselines=None)
    assert out.returncode == 1
    steps = {s["step_id"]: s for s in json.loads(out.stdout)["steps"]}
    assert steps["burn-in"]["status"] == "failed"
    assert "no stored burn-in baseline for GPU model SIM" in steps["burn-in"]["result"]["detail"]
    assert local_slurm.node_states()["gpu-3"] == "drained"  # it stays out
    assert _reservations(local_slurm) in ("", "No reservations in the system")
