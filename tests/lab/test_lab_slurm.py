"""The lab on a real, private Slurm: `aidc lab run --scheduler slurm`."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from aidc.failover.scheduler import LabScheduler
from aidc.lab.cluster import LabCluster, LabError
from aidc.lab.run import LabRun
from aidc.lab.slurm_lab import EvictingScheduler, SlurmLabCluster
from aidc.spec import load_stack


def lab_processes(lab_dir: Path) -> list[str]:
    """Every process on this machine that belongs to the lab: its directory on the command line,
    or its private Slurm's conf in the environment (daemons, slurmstepd, job tasks, workers)."""
    lab_dir = lab_dir.resolve()
    conf = f"SLURM_CONF={lab_dir / 'slurm' / 'etc' / 'slurm.conf'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(lab_dir).encode() in cmdline or conf in environ.split(b"\0"):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name} {command[:120]}")
    return found


def test_the_controller_sees_the_lab_scheduled_by_its_private_slurm(tmp_path):
    lab = load_stack("lab")
    cluster = SlurmLabCluster(lab, tmp_path / "lab")
    cluster.create()
    view = load_stack(cluster.stack_view)
    assert view.scheduler == "slurm"
    assert view.slurm.conf == str(tmp_path / "lab" / "slurm" / "etc" / "slurm.conf")
    # Everything else is the lab's own stack: same nodes, same policy.
    assert view.nodes() == lab.nodes() and view.policy == lab.policy
    # Recorded before anything starts, so `lab down` finds the Slurm of a run killed early.
    assert cluster.info()["slurm"]["root"] == str(tmp_path / "lab" / "slurm")


def test_an_evicting_backend_quarantines_first_and_a_failed_eviction_does_not_undo_it(tmp_path):
    cluster = LabCluster(load_stack("lab"), tmp_path / "lab")
    cluster.create()
    seen = []

    def evict(node):
        seen.append((node, LabScheduler(cluster.dir).state(node)))
        raise ConnectionError("rendezvous store gone")

    backend = EvictingScheduler(LabScheduler(cluster.dir), evict)
    problem = backend.quarantine("gpu-1", "aidc: XID 79")
    assert seen == [("gpu-1", "quarantined")]  # the hook runs after the node is out of service
    assert "rendezvous store gone" in problem
    assert backend.state("gpu-1") == "quarantined" and backend.name == "lab"


def test_scheduler_other_than_lab_or_slurm_is_refused_naming_the_choices(aidc_cli, tmp_path):
    out = aidc_cli("lab", "run", "--scheduler", "pbs", "--state-dir", str(tmp_path / "lab"))
    assert out.returncode == 2 and "'pbs'; valid: lab, slurm" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "lab").exists()


def test_lab_down_stops_the_slurm_and_the_job_a_killed_run_left_behind(aidc_cli, tmp_path, slurm_runnable):
    cluster = SlurmLabCluster(load_stack("lab"), tmp_path / "lab")
    cluster.create()  # no owner recorded: what a killed `aidc lab run` leaves
    cluster.start_slurm()
    job = cluster.slurm.run("sbatch", "--parsable", "--nodes=1", "--nodelist=gpu-1", "--output=/dev/null",
                            "--wrap", "srun sleep 300").stdout.strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and f"{job}.0" not in cluster.slurm.run("squeue", "-h", "-s", "-o", "%i").stdout:
        time.sleep(0.2)
    listed = {p["name"] for p in json.loads(aidc_cli("lab", "status", "--lab-dir", str(cluster.dir), "--json").stdout)["running"]}
    assert {"slurm:munged", "slurm:slurmctld", "slurm:slurmd:gpu-1", "slurm:sleep"} <= listed

    out = aidc_cli("lab", "down", "--lab-dir", str(cluster.dir), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["stopped"] >= 7  # munged, slurmctld, 5 slurmd, ...
    assert cluster.running() == []
    assert lab_processes(cluster.dir) == []


def test_a_training_job_that_ends_before_training_starts_fails_the_lab_at_once(tmp_path, slurm_runnable):
    run = LabRun(load_stack("lab"), "lab", tmp_path / "lab", progress=lambda _: None, scheduler="slurm")
    run.cluster._step_line = lambda node, spare: "false &"  # every node's step fails at once
    run.cluster.create()
    try:
        run.cluster.start_slurm()
        # Said as soon as Slurm has ended the job, not as the warm-up's timeout.
        with pytest.raises(LabError, match=r"training job 1 ended before training started: see .*train-job.log"):
            run.start_training()
    finally:
        run.cluster.stop()
    assert lab_processes(run.cluster.dir) == []


@pytest.mark.slow
def test_lab_loop_on_slurm_drains_the_faulty_node_and_finishes_on_the_spare(aidc_cli, tmp_path, slurm_runnable):
    lab_dir = tmp_path / "lab"
    out = aidc_cli("lab", "run", "--scheduler", "slurm", "--json", "--lab-dir", str(lab_dir), timeout=570)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    for key in ("certified_nodes", "detect_ms", "resume_s", "steps_lost", "ettr", "report_html", "audit_db"):
        assert key in summary, key
    assert summary["scheduler"] == "slurm"
    assert summary["completed"] and summary["audit_verified"]
    assert summary["steps_lost"] <= 1 and summary["detect_ms"] > 0 and summary["resume_s"] > 0
    # The reason Slurm shows is aidc's, for this fault.
    assert summary["drain_reason"].startswith("aidc:") and "79" in summary["drain_reason"]

    # Training ran as Slurm job steps and finished on the new membership, spare in, victim out.
    steps = [json.loads(line) for line in (lab_dir / "train" / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == load_stack("lab").lab.train_steps
    assert "gpu-spare-0" in steps[-1]["world"] and summary["victim"] not in steps[-1]["world"]
    trace = (lab_dir / "train" / "trace-gpu-spare-0.log").read_text()
    assert "in Slurm step" in trace and "on gpu-spare-0, CUDA_VISIBLE_DEVICES=0,1" in trace

    # The drain and the quarantine are in the verified audit log: aidc changed Slurm twice, a drain
    # of the victim and a cancel of its one step; the job (its batch script on the spare) ran on.
    records = json.loads((lab_dir / "report" / "report.json").read_text())["records"]
    kinds = {r["kind"] for r in records}
    assert {"failover.decision", "failover.action", "lab.inject", "lab.resume", "lab.summary"} <= kinds
    changes = [(r["node"], r["payload"]["argv"]) for r in records if r["kind"] == "slurm.command"]
    assert [(node, argv[:2]) for node, argv in changes] == [(summary["victim"], ["scontrol", "update"]),
                                                            (summary["victim"], ["scancel", changes[1][1][1]])]
    assert f"Reason={summary['drain_reason']}" in changes[0][1]
    assert re.fullmatch(r"\d+\.\d+", changes[1][1][1])  # one step (job.step), never the whole job
    assert "Launching batch job" in (lab_dir / "slurm" / "log" / "slurmd.gpu-spare-0.log").read_text()

    # Nothing the lab started is left: no lab process, no Slurm daemon, slurmstepd or job task.
    assert LabCluster(load_stack("lab"), lab_dir).running() == []
    assert lab_processes(lab_dir) == []
