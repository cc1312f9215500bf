"""Burn-in through a real Slurm: one accounted job, one task per named node, the same node program."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from aidc.audit.log import AuditLog


def burnin_stack(local_slurm, directory, device_timeout_s: float = 2.0, floors: dict | None = None):
    spec = {"name": "slurmburn", "device_backend": "sim", "scheduler": "slurm",
            "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1}],
            "slurm": {"conf": str(local_slurm.conf), "burnin": {"partition": local_slurm.partition}},
            "agent": {"device_timeout_s": device_timeout_s},
            # Small and tolerant: verdicts on timing are specified in test_judge.py, not here.
            "policy": {"burnin": {"fleet_tolerance": 0.95, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
                                  "allreduce_min_bytes": 4096, "allreduce_max_bytes": 16384, "train_steps": 10,
                                  "min_busbw_fraction": 0.0, "busbw_fleet_tolerance": 0.99,
                                  "storage_bytes": 1 << 20, "storage_files": 10, "storage_tolerance": 0.99,
                                  **({"floors": floors} if floors is not None else {})}}}
    path = directory / "Pulumi.slurmburn.yaml"
    path.write_text(yaml.safe_dump({"config": {"aidc:cluster": spec}}))
    return path


@pytest.mark.slow
def test_burnin_through_slurm_certifies_only_the_named_nodes_in_one_job_sacct_shows(local_slurm, tmp_path, aidc_cli):
    """Four nodes of five (the spare left out) in one srun job."""
    stack = burnin_stack(local_slurm, tmp_path)
    lab = tmp_path / "lab"
    named = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
    proc = aidc_cli("burnin", "run", "--stack", str(stack), "--lab-dir", str(lab), "--nodes", "gpu-3,gpu-2,gpu-0,gpu-1",
                    "--timeout", "300", "--json", timeout=420)  # Slurm is reached through the stack's slurm.conf
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["launcher"] == "slurm" and out["job_id"].isdigit()
    assert [(n["node"], n["verdict"], n["failed_gpus"]) for n in out["nodes"]] == [(n, "pass", []) for n in named]
    # Every node ran the whole node program: per-GPU benches, the five collectives, three trainings.
    for node in out["nodes"]:
        assert len(node["gpus"]) == 2 and set(node["collectives"]) == {
            "all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"}
        assert node["training"]["steps"] == 10 and set(node["parallel"]) == {"fsdp", "pipeline"}
    accounted = local_slurm.run("sacct", "-c", "-n", "-P", "-j", out["job_id"], "-o", "JobID,JobName,NodeList,State")
    rows = [line.split("|") for line in accounted.stdout.splitlines() if line.strip()]
    assert [(r[0], r[1], r[3]) for r in rows] == [(out["job_id"], "aidc-burnin", "COMPLETED")], accounted.stdout
    assert rows[0][2] == "gpu-[0-3]"
    with AuditLog(lab / "audit.db") as audit:
        certs = audit.records(kind="burnin.certificate")
        assert audit.verify().ok
    assert sorted(r.node for r in certs) == named
    assert all(r.payload["launcher"] == {"name": "slurm", "job_id": out["job_id"]} for r in certs)


@pytest.mark.slow
def test_the_lab_stack_burns_in_through_its_kept_slurm_lab(tmp_path, aidc_cli, slurm_runnable):
    from aidc.lab.slurm_lab import SlurmLabCluster
    from aidc.spec import load_stack

    cluster = SlurmLabCluster(load_stack("lab"), tmp_path / "lab")
    cluster.create()  # what `aidc lab run --scheduler slurm --keep` leaves: lab.json naming its running Slurm
    try:
        cluster.start_slurm()
        proc = aidc_cli("burnin", "run", "--stack", "lab", "--scheduler", "slurm", "--lab-dir", str(cluster.dir),
                        "--nodes", "gpu-3,gpu-1", "--timeout", "300", "--json", timeout=420)
        assert proc.returncode in (0, 1), proc.stderr[-3000:]  # verdicts on timing are not under test here
        out = json.loads(proc.stdout)
        assert out["launcher"] == "slurm"
        assert [n["node"] for n in out["nodes"]] == ["gpu-1", "gpu-3"]
        assert all(n["verdict"] in ("pass", "fail") and isinstance(n["failed_gpus"], list) for n in out["nodes"])
        accounted = cluster.slurm.run("sacct", "-c", "-n", "-P", "-j", out["job_id"], "-o", "JobName,NodeList")
        assert accounted.stdout.split() == ["aidc-burnin|gpu-[1,3]"]
    finally:
        aidc_cli("lab", "down", "--lab-dir", str(cluster.dir))


@pytest.mark.slow
def test_a_burnin_job_past_its_timeout_is_cancelled_and_recorded_as_aborted(local_slurm, tmp_path, aidc_cli):
    from aidc.burnin.runner import lab_node_dirs
    from aidc.device.sim import inject
    from aidc.spec import load_stack

    stack = burnin_stack(local_slurm, tmp_path, device_timeout_s=300)  # gpu-1 waits silently in a device call
    lab = tmp_path / "lab"
    inject(lab_node_dirs(load_stack(stack), lab)["gpu-1"], "hang", seconds=300)
    tmp = tmp_path / "tmp"  # the command's and (srun passes its environment on) the tasks' temp dir
    tmp.mkdir()
    proc = aidc_cli("burnin", "run", "--stack", str(stack), "--lab-dir", str(lab), "--nodes", "gpu-1,gpu-3",
                    "--timeout", "60", "--json", timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 2 and "timed out" in proc.stderr and "Traceback" not in proc.stderr
    # The cancelled tasks (killed mid-run) and the command leave nothing of the run on disk.
    assert [p.name for p in tmp.iterdir() if p.name.startswith("aidc-burnin")] == []
    with AuditLog(lab / "audit.db") as audit:
        assert audit.records(kind="burnin.certificate") == []
        aborted = audit.records(kind="burnin.aborted")
    assert len(aborted) == 1 and aborted[0].payload["nodes"] == ["gpu-1", "gpu-3"]
    job = aborted[0].payload["launcher"]["job_id"]
    assert aborted[0].payload["launcher"]["name"] == "slurm" and job.isdigit()
    assert local_slurm.run("squeue", "-h", "-j", job, check=False).stdout.strip() == ""  # nothing left running
    accounted = local_slurm.run("sacct", "-c", "-n", "-P", "-j", job, "-o", "JobName,State").stdout.split()
    assert accounted == ["aidc-burnin|CANCELLED"]


@pytest.mark.slow
def test_sdc_on_one_gpu_fails_exactly_that_node_and_gpu_through_slurm(local_slurm, tmp_path, aidc_cli):
    """The known-answer checks run in the Slurm tasks: a GPU that computes wrong without an error
    fails its node alone, naming that GPU, while the other nodes of the same job pass."""
    from aidc.burnin.runner import lab_node_dirs
    from aidc.device.sim import inject
    from aidc.spec import load_stack
    from tests.burnin.sdc_expectations import NO_TIMING_FLOORS, assert_only_gpu_1_of_node_gpu_1_failed

    stack = burnin_stack(local_slurm, tmp_path, floors=NO_TIMING_FLOORS)
    lab = tmp_path / "lab"
    inject(lab_node_dirs(load_stack(stack), lab)["gpu-1"], "sdc", gpu=1)  # what `aidc device inject ... sdc` does
    proc = aidc_cli("burnin", "run", "--stack", str(stack), "--lab-dir", str(lab), "--nodes", "gpu-0,gpu-1,gpu-2",
                    "--timeout", "300", "--json", timeout=420)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a node failed its burn-in: not an error of the run
    out = json.loads(proc.stdout)
    assert out["launcher"] == "slurm"
    assert_only_gpu_1_of_node_gpu_1_failed(out, lab)
