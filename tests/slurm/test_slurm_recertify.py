"""Recertification through a real Slurm: fault -> quarantine (drain) -> burn-in of the drained node
alone, inside a maintenance reservation only aidc may use -> release; a failing recertification
keeps the node drained with aidc's own reason naming why."""

from __future__ import annotations

import json

import pytest

from aidc.audit import AuditLog
from tests.runbook.recertify_case import LOW, prepare, write_stack

from .slurm_helpers import reason


def _run(aidc_cli, tmp_path, local_slurm, node, *, inject_sdc=False, baselines=LOW):
    stack = write_stack(tmp_path, "recert", "slurm", slurm={
        "conf": str(local_slurm.conf), "command_timeout_s": 5.0, "burnin": {"partition": local_slurm.partition}})
    args = prepare(aidc_cli, tmp_path, stack, tmp_path / "site", node, inject_sdc_gpu=1 if inject_sdc else None,
                   baselines=baselines)
    return aidc_cli("runbook", "run", *args, timeout=600), AuditLog(tmp_path / "audit.db")


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
    assert (burnin["verdict"], burnin["launcher"], burnin["reservation"]) == ("pass", "slurm", "aidc-recert-gpu-2")
    # The job ran in the reservation, on the one node, and nothing of aidc's is left behind.
    acct = local_slurm.run("sacct", "-c", "-n", "-P", "-X", "-j", burnin["job_id"], "-o",
                           "JobName,NodeList,Reservation,State").stdout.split()
    assert acct == ["aidc-burnin|gpu-2|aidc-recert-gpu-2|COMPLETED"]
    assert _reservations(local_slurm) in ("", "No reservations in the system")
    assert local_slurm.node_states()["gpu-2"].startswith("idle") and reason(local_slurm, "gpu-2") == "none"
    # Drained, reserved for aidc, opened inside the reservation, drained again before the
    # reservation goes (never open to other jobs), then resumed by the release step.
    assert _slurm_commands(audit) == [
        "update NodeName=gpu-2 State=DRAIN", "create reservation ReservationName=aidc-recert-gpu-2",
        "update NodeName=gpu-2 State=RESUME", "update NodeName=gpu-2 State=DRAIN",
        "delete ReservationName=aidc-recert-gpu-2", "update NodeName=gpu-2 State=RESUME"]
    certs = audit.records(kind="burnin.certificate")
    assert [(c.node, c.payload["verdict"]) for c in certs] == [("gpu-2", "pass")]
    # The tests the runbook lists ran in the Slurm task, and only those: no training run.
    assert certs[0].payload["tests"] == burnin["tests"] == ["gemm", "memcpy", "allreduce"]
    assert certs[0].payload["training"] == {} and list(certs[0].payload["collectives"]) == ["all_reduce"]
    assert certs[0].payload["metrics"]["gemm_fp32_tflops"] > 0 and certs[0].payload["gpus"][0]["known_answer"]
    # Released only after that signed pass: the release step's record follows the certificate.
    release = [r for r in audit.records(kind="runbook.step") if r.payload.get("step") == "back"]
    assert release and release[-1].seq > certs[0].seq
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
    # Its reasons are in the signed audit log (the certificate, the step's record) and in the report.
    assert certs[0].payload["reasons"] == result["reasons"] and 1 in certs[0].payload["failed_gpus"]
    assert any("silent data corruption" in r for r in result["reasons"])
    step_records = [r for r in audit.records(kind="runbook.step") if r.payload.get("step") == "burn-in"]
    assert step_records and step_records[-1].payload["result"]["reasons"] == result["reasons"]
    assert all(r.payload.get("step") != "back" for r in audit.records(kind="runbook.step"))
    assert audit.verify().ok


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


def test_a_recertification_window_a_crash_left_open_is_closed_on_restart(local_slurm, tmp_path):
    """aidc died (SIGKILL) inside the window, the node resumed inside its reservation: the restarted
    step's recovery drains it again with aidc's marked reason (the drain's event kept) and deletes
    the reservation, once."""
    import subprocess
    import sys

    from aidc.failover.slurm import SlurmScheduler
    from aidc.runbook.actuators import StageBurninRunner
    from aidc.spec import load_stack

    stack = write_stack(tmp_path, "recert", "slurm", slurm={"conf": str(local_slurm.conf)})
    audit = AuditLog(tmp_path / "audit.db")
    sched = SlurmScheduler(conf=str(local_slurm.conf), audit=audit)
    sched.quarantine("gpu-3", "fault on gpu-3", event="run-7")
    crash = subprocess.run([sys.executable, "-c", (
        "import os, signal; from aidc.audit import AuditLog; from aidc.failover.slurm import SlurmScheduler\n"
        f"s = SlurmScheduler(conf={str(local_slurm.conf)!r}, audit=AuditLog({str(tmp_path / 'audit.db')!r}))\n"
        "with s.recertification('gpu-3'):\n    os.kill(os.getpid(), signal.SIGKILL)")], capture_output=True)
    assert crash.returncode == -9, crash.stderr
    assert local_slurm.node_states()["gpu-3"].startswith("idle") and "aidc-recert-gpu-3" in _reservations(local_slurm)
    runner = StageBurninRunner(load_stack(str(stack)), tmp_path, audit, scheduler=sched)
    assert runner.recover("gpu-3") == {"closed_reservation": "aidc-recert-gpu-3"}
    status = sched.node("gpu-3")
    assert status.drained_by_aidc and status.reason.startswith("aidc: recertification interrupted")
    assert status.aidc_event == "run-7"
    assert _reservations(local_slurm) in ("", "No reservations in the system")
    assert runner.recover("gpu-3") == {}  # nothing left to close
    assert sched.node("gpu-3").reason == status.reason
