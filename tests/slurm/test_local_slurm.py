"""The private Slurm the lab and the tests run aidc against: real daemons, stopped by PID."""

from __future__ import annotations

from aidc.process import same_process_alive


def test_every_node_comes_up_idle_with_its_gpus_and_jobs_get_them(local_slurm):
    assert local_slurm.node_states() == {n.name: "idle" for n in local_slurm.nodes}
    out = local_slurm.run("srun", "-N1", "-w", "gpu-2", "--gres=gpu:2", "printenv", "CUDA_VISIBLE_DEVICES").stdout
    assert out.strip() == "0,1"


def test_stop_ends_every_daemon_it_started_and_a_second_stop_does_nothing(local_slurm):
    daemons = local_slurm._info()["daemons"]
    assert set(daemons) == {"munged", "slurmctld", *(f"slurmd:{n.name}" for n in local_slurm.nodes)}
    stopped = local_slurm.stop()
    assert {"munged", "slurmctld"} <= set(stopped)
    assert not any(same_process_alive(p["pid"], p["start"]) for p in daemons.values())
    assert local_slurm.stop() == []


def test_slurmctld_can_be_stopped_and_started_again_keeping_node_state(local_slurm):
    local_slurm.run("scontrol", "update", "NodeName=gpu-1", "State=DRAIN", "Reason=aidc: kept")
    local_slurm.stop_daemon("slurmctld")
    assert local_slurm.run("scontrol", "ping", check=False).returncode != 0
    local_slurm.start_daemon("slurmctld")
    assert "aidc: kept" in local_slurm.run("sinfo", "-R", "-h", "-o", "%E").stdout


def test_batch_and_job_steps_start_under_a_root_deeper_than_a_unix_socket_path_allows(tmp_path, slurm_runnable):
    from aidc.lab.slurm_cluster import LocalSlurm, SlurmNode

    root = tmp_path / ("deep-" * 16) / "slurm"  # slurmd names step sockets <spool>/<node>_<job>.<step>
    cluster = LocalSlurm(root, [SlurmNode("gpu-spare-0", 1)])
    try:
        cluster.start()
        out = cluster.run("sbatch", "--wait", f"--output={tmp_path / 'job.out'}", "--wrap", "srun printenv SLURM_STEP_ID",
                          timeout=60)
        assert out.returncode == 0
        assert (tmp_path / "job.out").read_text().strip() == "0"
    finally:
        cluster.stop()
    assert not cluster.sockets.exists()
