"""End to end: real worker processes, real gloo all_reduce and DDP on 127.0.0.1."""

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from aidc.audit.log import AuditLog
from aidc.burnin import runner
from aidc.burnin.runner import run_burnin
from aidc.device.sim import create_node, inject
from aidc.errors import BurninError
from aidc.spec import parse_spec


def small_spec(nodes: int = 3, gpus_per_node: int = 1, **burnin) -> object:
    return parse_spec({
        "name": "mini", "device_backend": "sim", "scheduler": "lab",
        "node_pools": [{"name": "n", "count": nodes, "gpu_model": "SIM", "gpus_per_node": gpus_per_node}],
        "agent": {"device_timeout_s": 1.0},
        "policy": {"burnin": {"fleet_tolerance": 0.5, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
                              "allreduce_min_bytes": 4096, "allreduce_max_bytes": 16384, "train_steps": 10,
                              # At 4-16 KiB a collective's time is mostly the scheduling of every rank on
                              # this shared host (a node's busbw measured 38-72% below the others' under
                              # load): the busbw fleet rule is specified on figures, in test_judge.py.
                              "min_busbw_fraction": 0.0, "busbw_fleet_tolerance": 0.95, "storage_bytes": 1 << 20,
                              "storage_files": 20, "storage_tolerance": 0.95, **burnin}},
    })


def make_nodes(spec, root: Path) -> dict[str, Path]:
    return {n.name: create_node(root / n.name, n.name, n.gpus, i) for i, n in enumerate(spec.nodes())}


def burnin_processes(marker: Path) -> dict[int, int]:
    """pid -> ppid of live processes whose command line names `marker` (the run's temp dir)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z" and str(marker).encode() in cmdline:
            out[int(proc.name)] = int(ppid)
    return out


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """The runner's temp dir goes under tmp_path, so the test can find its processes."""
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(runs))
    return runs


@pytest.mark.slow
def test_flipped_bit_on_one_rank_and_hung_device_on_another_fail_only_those_nodes(tmp_path, run_dir):
    spec = small_spec(3, fleet_tolerance=0.95)  # timing noise is not under test here
    dirs = make_nodes(spec, tmp_path / "nodes")
    inject(dirs["n-1"], "hang", seconds=120)
    with AuditLog(tmp_path / "audit.db") as audit:
        report = run_burnin(spec, dirs, audit, corrupt_nodes=frozenset({"n-0"}))
        certs = {r.node: r for r in audit.records(kind="burnin.certificate")}
    assert report.verdicts == {"n-0": "fail", "n-1": "fail", "n-2": "pass"}, report.reasons
    assert any("silent data corruption" in r for r in report.nodes["n-0"].reasons)
    assert any("did not return within" in r for r in report.nodes["n-1"].reasons)
    assert set(certs) == {"n-0", "n-1", "n-2"}
    assert certs["n-2"].payload["verdict"] == "pass" and certs["n-0"].payload["verdict"] == "fail"
    # Each certificate names the floors its node was judged against (the report draws them).
    assert certs["n-2"].payload["floors"] == spec.floors(spec.nodes()[2].gpu_model)
    sweeps = report.to_dict()["collectives"]
    assert list(sweeps) == ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"]
    factors = {"all_reduce": 2 * 2 / 3, "all_gather": 2 / 3, "reduce_scatter": 2 / 3, "broadcast": 1.0,
               "all_to_all": 2 / 3}
    for op, rows in sweeps.items():
        assert all(row["correct"] for row in rows), op
        assert rows[0]["busbw_gbps"] == pytest.approx(rows[0]["algbw_gbps"] * factors[op])
        assert rows[-1]["link_fraction"] == pytest.approx(rows[-1]["busbw_gbps"] / (spec.fabric.link_speed_gbps / 8))
    # Sharded and pipelined training: every rank agrees and ends where DDP did (the flipped bit
    # comes after the DDP run, so n-0's FSDP and pipeline runs are clean).
    for mode in ("fsdp", "pipeline"):
        runs = [n.parallel[mode] for n in report.nodes.values()]
        assert len({r["param_digest"] for r in runs}) == 1 and all(r["max_abs_diff_vs_ddp"] < 1e-5 for r in runs)
        assert all(r["loss_after"] < r["loss_before"] for r in runs)
    assert set(report.fleet["step_time_ms"]) == {"ddp", "fsdp", "pipeline"}
    assert set(certs["n-2"].payload["collectives"]) == set(sweeps)
    assert burnin_processes(run_dir) == {}


@pytest.mark.slow
def test_busbw_below_the_policy_fraction_of_the_given_link_rate_fails_every_node_with_the_figures(tmp_path, run_dir):
    spec = small_spec(2, min_busbw_fraction=0.5, fleet_tolerance=0.95)
    dirs = make_nodes(spec, tmp_path / "nodes")
    with AuditLog(tmp_path / "audit.db") as audit:
        report = run_burnin(spec, dirs, audit, link_rate_gbps=10_000.0)  # as a fabric passes its own rate
        certs = {r.node: r.payload for r in audit.records(kind="burnin.certificate")}
    assert report.failed_nodes == ["n-0", "n-1"]
    for node in ("n-0", "n-1"):
        reasons = [r for r in report.nodes[node].reasons if "of the link rate 1e+04 GB/s (policy floor 50%)" in r]
        assert {r.split()[0] for r in reasons} == {"all_reduce", "all_gather", "reduce_scatter", "broadcast",
                                                   "all_to_all"}
        assert certs[node]["link_rate_gbps"] == 10_000.0 and certs[node]["verdict"] == "fail"
        row = certs[node]["collectives"]["all_gather"][-1]
        assert set(row) >= {"bytes", "algbw_gbps", "busbw_gbps", "link_fraction"}
        assert row["link_fraction"] == pytest.approx(row["busbw_gbps"] / 10_000.0)


def test_a_run_past_its_deadline_is_an_error_audited_as_aborted_and_leaves_no_processes(tmp_path, run_dir):
    spec = small_spec(2)
    dirs = make_nodes(spec, tmp_path / "nodes")
    with AuditLog(tmp_path / "audit.db") as audit:
        with pytest.raises(BurninError, match="timed out"):
            run_burnin(spec, dirs, audit, timeout_s=0.5)
        aborted = audit.records(kind="burnin.aborted")
        assert audit.records(kind="burnin.certificate") == []
    assert len(aborted) == 1 and "timed out" in aborted[0].reason
    assert burnin_processes(run_dir) == {}


@pytest.mark.slow
def test_a_deadline_reached_while_nodes_compute_stops_every_node_process(tmp_path, run_dir, monkeypatch):
    spec = small_spec(2).model_copy(update={"agent": small_spec(2).agent.model_copy(update={"device_timeout_s": 200})})
    dirs = make_nodes(spec, tmp_path / "nodes")
    inject(dirs["n-0"], "hang", seconds=200)  # n-0 blocks in a device call, n-1 in a barrier
    # The runner's clock jumps past the deadline once both node processes run, so the
    # deadline is reached mid-computation however long the machine takes to start them.
    skew = [0.0]
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + skew[0]))
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            procs = burnin_processes(run_dir)
            seen.append(sum(1 for ppid in procs.values() if ppid in procs))
            if seen[-1] == 2:
                time.sleep(1.0)
                skew[0] = 10_000.0
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(BurninError, match="timed out"):
            run_burnin(spec, dirs, None, timeout_s=300)
    finally:
        stop.set()
        watcher.join()
    assert max(seen) == 2
    assert burnin_processes(run_dir) == {}


@pytest.mark.slow
def test_a_node_process_that_dies_is_an_error_naming_it_and_its_peers_are_stopped(tmp_path, run_dir):
    spec = small_spec(3)
    dirs = make_nodes(spec, tmp_path / "nodes")
    inject(dirs["n-0"], "hang", seconds=120)  # keeps the workers alive until one is killed
    killed = []

    def kill_one_worker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            procs = burnin_processes(run_dir)
            workers = [pid for pid, ppid in procs.items() if ppid in procs]  # forked by the zygote
            if len(workers) == 3:
                time.sleep(0.5)
                os.kill(max(workers), signal.SIGKILL)
                killed.append(max(workers))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    try:
        with pytest.raises(BurninError, match=r"burn-in process of node n-\d died \(exit code -9\)"):
            run_burnin(spec, dirs, None, timeout_s=120)
    finally:
        killer.join()
    assert killed
    assert burnin_processes(run_dir) == {}


def test_missing_node_directories_are_named(tmp_path):
    spec = small_spec(2)
    with pytest.raises(BurninError, match="no node directory for n-1"):
        run_burnin(spec, {"n-0": tmp_path}, None)


@pytest.mark.slow
def test_lab_cli_fails_the_slowed_node_naming_the_fleet_median_and_certifies_the_rest(tmp_path, aidc_cli):
    lab = tmp_path / "lab"
    setup = aidc_cli("burnin", "run", "--help")
    assert setup.returncode == 0 and "--state-dir" in setup.stdout
    from aidc.burnin.runner import lab_node_dirs
    from aidc.spec import load_stack

    dirs = lab_node_dirs(load_stack("lab"), lab)
    inject(dirs["gpu-2"], "slowdown", factor=4.0)
    proc = aidc_cli("burnin", "run", "--stack", "lab", "--lab-dir", str(lab), "--json", timeout=240)
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["failed_nodes"] == ["gpu-2"], out["reasons"]
    assert out["certified_nodes"] == ["gpu-0", "gpu-1", "gpu-3", "gpu-spare-0"]
    assert any("below the fleet median" in r and r.startswith("gemm_") for r in out["reasons"]["gpu-2"])
    assert out["launcher"] == "lab" and out["job_id"] is None
    nodes = {n["node"]: n for n in out["nodes"]}
    assert [n["node"] for n in out["nodes"]] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]
    assert {name: n["verdict"] for name, n in nodes.items()} == out["verdicts"]
    assert set(nodes["gpu-0"]["metrics"]) >= {"gemm_fp32_tflops", "gemm_bf16_tflops", "memcpy_gbps",
                                              "allreduce_busbw_gbps"}
    assert nodes["gpu-2"]["gpus"][0]["gemm_fp32"]["work_factor"] == 4.0
    for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"):
        top = out["collectives"][op][-1]
        assert {"bytes", "time_us", "algbw_gbps", "busbw_gbps", "link_fraction"} <= set(top)
        assert 4 * 1024 * 1024 - 5 * 4 < top["bytes"] <= 4 * 1024 * 1024  # S rounded down to 5 equal chunks
    # Judged against the rail rate of the lab's netns fabric (the spec's 10 Gb/s, scaled), in GB/s.
    fabric = out["fleet"]["fabric"]
    assert fabric["kind"] == "netns" and out["link_rate_gbps"] == pytest.approx(fabric["rail_mbit"] / 8000)
    assert set(out["step_time_ms"]) == {"ddp", "fsdp", "pipeline"}
    with AuditLog(lab / "audit.db") as audit:
        certs = audit.records(kind="burnin.certificate")
        assert audit.verify().ok
    assert sorted(r.node for r in certs) == sorted(out["verdicts"])
    assert "fleet median" in next(r for r in certs if r.node == "gpu-2").reason
    from aidc.lab import fabric

    assert fabric.list_namespaces(fabric.lab_tag(lab)) == []  # a fabric built for the run goes with it


@pytest.mark.parametrize("scheduler,named", [("lab", "nvml"), ("kubernetes", "kubernetes")])
def test_cli_refuses_a_stack_it_cannot_launch_without_a_traceback(tmp_path, aidc_cli, scheduler, named):
    # GPU nodes on the lab's launcher (it forks simulated nodes here), or a scheduler with no
    # burn-in launcher yet: one line naming why, nothing created under the lab directory.
    stack = tmp_path / "Pulumi.real.yaml"
    stack.write_text("config:\n  aidc:cluster:\n    name: real\n    device_backend: nvml\n"
                     f"    scheduler: {scheduler}\n    node_pools:\n"
                     "      - {name: gpu, count: 2, gpu_model: H100, gpus_per_node: 8}\n")
    proc = aidc_cli("burnin", "run", "--stack", str(stack), "--lab-dir", str(tmp_path / "lab"))
    assert proc.returncode == 2
    assert "aidc: error:" in proc.stderr and named in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "lab" / "nodes").exists()


@pytest.mark.slow
def test_killing_the_burnin_command_outright_leaves_no_node_processes(tmp_path, aidc_cli):
    import subprocess
    import sys

    runs = tmp_path / "runs"
    runs.mkdir()
    spec_file = tmp_path / "Pulumi.mini.yaml"
    spec_file.write_text("config:\n  aidc:cluster:\n    name: mini\n    device_backend: sim\n    scheduler: lab\n    node_pools:\n"
                         "      - {name: n, count: 2, gpu_model: SIM, gpus_per_node: 1}\n"
                         "    agent: {device_timeout_s: 200}\n")  # n-0 waits silently in a device call
    dirs = make_nodes(parse_spec({"name": "mini", "device_backend": "sim", "node_pools": [
        {"name": "n", "count": 2, "gpu_model": "SIM", "gpus_per_node": 1}]}), tmp_path / "lab" / "nodes")
    inject(dirs["n-0"], "hang", seconds=200)  # the run cannot finish on its own before we kill it
    cli = subprocess.Popen([sys.executable, "-m", "aidc", "burnin", "run", "--stack", str(spec_file),
                            "--lab-dir", str(tmp_path / "lab"), "--json"],
                           env={**os.environ, "TMPDIR": str(runs)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # until both node processes run (bounded: 120 s)
            procs = burnin_processes(runs)
            if sum(1 for ppid in procs.values() if ppid in procs) == 2:
                break
            time.sleep(0.1)
        assert burnin_processes(runs), "the node processes never started"
        cli.kill()
        cli.wait(timeout=10)
        for _ in range(100):  # the kernel delivers the parent-death signals: wait for them (bounded: 10 s)
            if not burnin_processes(runs):
                break
            time.sleep(0.1)
        assert burnin_processes(runs) == {}
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for pid in burnin_processes(runs):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sdc_on_one_gpu_fails_exactly_that_node_and_gpu_though_the_digest_vote_passes(tmp_path, run_dir):
    from aidc.burnin.judge import compare_digests

    spec = small_spec(3, fleet_tolerance=0.95, gpus_per_node=2)  # timing noise is not under test here
    dirs = make_nodes(spec, tmp_path / "nodes")
    inject(dirs["n-1"], "sdc", gpu=1)
    with AuditLog(tmp_path / "audit.db") as audit:
        report = run_burnin(spec, dirs, audit)
        certs = {r.node: r for r in audit.records(kind="burnin.certificate")}
    assert report.verdicts == {"n-0": "pass", "n-1": "fail", "n-2": "pass"}, report.reasons
    nodes = report.to_dict()["nodes"]
    assert [(n["node"], n["failed_gpus"]) for n in nodes] == [("n-0", []), ("n-1", [1]), ("n-2", [])]
    assert all("GPU 1" in r for r in report.nodes["n-1"].reasons)
    assert any("train_step" in r for r in report.nodes["n-1"].reasons)  # its training steps went wrong too
    # The node's training rank computed with the corrupted GPU, yet DDP averaged its gradients
    # into every rank: the parameter-digest vote alone passes every node.
    for mode in ("ddp", "fsdp", "pipeline"):
        assert compare_digests({name: n.run(mode)["param_digest"] for name, n in report.nodes.items()}) == {}
    assert certs["n-1"].payload["failed_gpus"] == [1] and certs["n-0"].payload["failed_gpus"] == []
    assert certs["n-0"].payload["dcgm"]["present"] is False  # no DCGM here: stated in the certificate
    assert any("dcgmi" in note for note in certs["n-0"].payload["notes"])


def _mini_stack(tmp_path) -> Path:
    spec_file = tmp_path / "Pulumi.mini.yaml"
    spec_file.write_text("config:\n  aidc:cluster:\n    name: mini\n    device_backend: sim\n    scheduler: lab\n    node_pools:\n"
                         "      - {name: n, count: 2, gpu_model: SIM, gpus_per_node: 1}\n"
                         "    policy:\n      burnin: {fleet_tolerance: 0.95, gemm_size: 64, repeats: 1,"
                         " memcpy_bytes: 1048576, allreduce_min_bytes: 4096, allreduce_max_bytes: 8192,"
                         " train_steps: 5, min_busbw_fraction: 0.0, busbw_fleet_tolerance: 0.95,"
                         " storage_bytes: 1048576, storage_files: 5, storage_tolerance: 0.95}\n")
    return spec_file


def test_cli_refuses_a_known_answers_file_that_is_not_one_before_running(tmp_path, aidc_cli):
    bad = tmp_path / "answers.yaml"
    bad.write_text("version: 1\nanswers: [not, a, map]\n")
    proc = aidc_cli("burnin", "run", "--stack", str(_mini_stack(tmp_path)), "--lab-dir", str(tmp_path / "lab"),
                    "--known-answers", str(bad))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and not (tmp_path / "lab" / "audit.db").exists()


@pytest.mark.slow
def test_cli_records_the_answers_every_gpu_agreed_on_and_reports_failed_gpus(tmp_path, aidc_cli):
    from aidc.burnin.answers import load

    answers = tmp_path / "answers.yaml"
    proc = aidc_cli("burnin", "run", "--stack", str(_mini_stack(tmp_path)), "--lab-dir", str(tmp_path / "lab"),
                    "--known-answers", str(answers), "--record-known-answers", "--soak-s", "1", "--json",
                    timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [(n["node"], n["failed_gpus"]) for n in out["nodes"]] == [("n-0", []), ("n-1", [])]
    nodes = {n["node"]: n for n in out["nodes"]}
    soaked = nodes["n-1"]["soak"]
    assert soaked["seconds"] == 1 and len(soaked["series"]["0"]) == soaked["samples"] == 8
    stored = load(answers)
    key = nodes["n-0"]["gpus"][0]["known_answer"]["key"]
    assert list(stored) == [key] and stored[key] == nodes["n-1"]["gpus"][0]["known_answer"]["fingerprints"]
