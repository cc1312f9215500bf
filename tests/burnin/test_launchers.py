"""One burn-in path for every stack: launchers by scheduler name, the Slurm job's shape, the job's
own rendezvous store, and the JSON every launcher prints."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from aidc.burnin.launch import launcher_for, registered_launchers, resolve_stack, select_nodes
from aidc.burnin.report import BurninReport, NodeResult
from aidc.errors import BurninError
from aidc.spec import parse_spec

SLURM_STACK = {
    "name": "gpus", "device_backend": "nvml", "scheduler": "slurm",
    "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "H100", "gpus_per_node": 8, "spares": 1}],
}


def slurm_spec(**burnin):
    return parse_spec({**SLURM_STACK, "slurm": {"conf": "/etc/slurm/slurm.conf", "burnin": burnin}})


def test_every_scheduler_with_a_launcher_is_found_by_its_name():
    assert set(registered_launchers()) >= {"lab", "slurm", "kubernetes"}
    for name in registered_launchers():
        launcher = launcher_for(name)
        assert launcher.name == name
        assert callable(launcher.run)


@pytest.mark.parametrize("name", ["nomad", "pbs", ""])
def test_a_scheduler_without_a_launcher_is_refused_naming_those_there_are(name):
    with pytest.raises(BurninError) as err:
        launcher_for(name)
    assert "lab" in str(err.value) and "slurm" in str(err.value)


def options(argv: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg.partition("=")
            out[key] = value if sep else True
    return out


@pytest.mark.parametrize("burnin,expected", [
    ({}, {}),
    ({"partition": "burn"}, {"--partition": "burn"}),
    ({"reservation": "maint-0412"}, {"--reservation": "maint-0412"}),
    ({"partition": "gpu", "reservation": "r1"}, {"--partition": "gpu", "--reservation": "r1"}),
])
def test_the_job_is_one_exclusive_task_per_named_node_in_the_specs_partition_and_reservation(burnin, expected):
    from aidc.burnin.launch.slurm import JOB_NAME, srun_argv

    spec = slurm_spec(**burnin)
    argv = srun_argv(spec, ["gpu-0", "gpu-2", "gpu-spare-0"], ["python", "-m", "aidc", "burnin", "node"])
    opts = options(argv[:argv.index("python")])
    assert argv[0] == "srun" and argv[argv.index("python"):] == ["python", "-m", "aidc", "burnin", "node"]
    assert opts["--nodelist"] == "gpu-0,gpu-2,gpu-spare-0"
    assert (opts["--nodes"], opts["--ntasks"], opts["--ntasks-per-node"]) == ("3", "3", "1")
    assert opts["--exclusive"] is True and opts["--job-name"] == JOB_NAME == "aidc-burnin"
    assert opts["--gres"] == "gpu:8"
    assert {k: v for k, v in opts.items() if k in ("--partition", "--reservation")} == expected


def test_nodes_limits_the_run_to_the_named_nodes_in_spec_order_and_refuses_unknown_ones():
    spec = slurm_spec()
    assert [n.name for n in select_nodes(spec, None)] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]
    assert [n.name for n in select_nodes(spec, "gpu-spare-0,gpu-1")] == ["gpu-1", "gpu-spare-0"]
    for bad in ("gpu-9", "gpu-0,,gpu-1", "", "gpu-0,gpu-0"):
        with pytest.raises(BurninError):
            select_nodes(spec, bad)


def test_the_lab_on_its_kept_slurm_burns_in_through_that_slurm(tmp_path):
    lab = parse_spec({**SLURM_STACK, "name": "lab", "device_backend": "sim", "scheduler": "lab"})
    assert resolve_stack(lab, None, tmp_path).scheduler == "lab"
    with pytest.raises(BurninError):  # no kept Slurm lab there
        resolve_stack(lab, "slurm", tmp_path)
    conf = tmp_path / "slurm" / "etc" / "slurm.conf"
    (tmp_path / "lab.json").write_text(json.dumps({"slurm": {"root": str(conf.parents[1]), "conf": str(conf)}}))
    on_slurm = resolve_stack(lab, "slurm", tmp_path)
    assert (on_slurm.scheduler, on_slurm.slurm.conf, on_slurm.device_backend) == ("slurm", str(conf), "sim")
    assert resolve_stack(lab, "lab", tmp_path).scheduler == "lab"


def test_the_json_lists_every_node_with_its_verdict_reasons_and_failed_gpus():
    nodes = {"gpu-0": NodeResult("gpu-0", "SIM", False, passed=True),
             "gpu-1": NodeResult("gpu-1", "SIM", False, passed=False, reasons=["memcpy_gbps below the floor"]),
             "gpu-spare-0": NodeResult("gpu-spare-0", "SIM", True, passed=True)}
    out = BurninReport("lab", nodes, {}).to_dict()
    assert [(n["node"], n["verdict"], n["reasons"], n["failed_gpus"]) for n in out["nodes"]] == [
        ("gpu-0", "pass", [], []), ("gpu-1", "fail", ["memcpy_gbps below the floor"], []),
        ("gpu-spare-0", "pass", [], [])]
    assert out["nodes"][2]["spare"] is True
    json.dumps(out)


def test_the_jobs_store_keeps_every_key_under_a_secret_a_client_without_it_cannot_see():
    import torch.distributed as dist

    from aidc.burnin.launch.store import JobStore, NodeStoreClient

    with JobStore("127.0.0.1", timeout_s=10) as first, JobStore("127.0.0.1", timeout_s=10) as second:
        assert first.secret != second.secret and first.port != second.port
        assert len(first.secret) >= 32
        first.put_json("config/gpu-0", {"rank": 0})
        bare = dist.TCPStore("127.0.0.1", first.port, is_master=False, timeout=timedelta(seconds=5))
        assert not bare.check(["config/gpu-0"])
        wrong = NodeStoreClient("127.0.0.1", first.port, second.secret, timeout_s=5)
        assert not wrong.store.check(["config/gpu-0"])
        right = NodeStoreClient("127.0.0.1", first.port, first.secret, timeout_s=5)
        assert right.get_json("config/gpu-0") == {"rank": 0}
        right.put_json("result/gpu-0", {"metrics": {"x": 1.0}})
        assert first.get_json("result/gpu-0") == {"metrics": {"x": 1.0}}


@pytest.mark.parametrize("raw", [b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", b"[1, 2]", b"not json", b"\xff"])
def test_a_value_in_the_store_that_is_not_a_json_object_is_refused_never_unpickled(raw):
    from aidc.burnin.launch.store import JobStore

    with JobStore("127.0.0.1", timeout_s=10) as store:
        store.store.set("result/gpu-0", raw)
        with pytest.raises(BurninError):
            store.get_json("result/gpu-0")


@pytest.mark.parametrize("env", [
    {},
    {"SLURMD_NODENAME": "gpu-0"},
    {"SLURMD_NODENAME": "gpu-0", "AIDC_BURNIN_STORE": "127.0.0.1:notaport", "AIDC_BURNIN_SECRET": "s"},
    {"SLURMD_NODENAME": "gpu-0", "AIDC_BURNIN_STORE": "127.0.0.1:29999"},
])
def test_the_node_program_outside_a_burnin_job_refuses_in_one_line(env):
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "AIDC_BURNIN"))}
    proc = subprocess.run([sys.executable, "-m", "aidc.burnin.launch.node"], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    import ipaddress
    import struct

    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(addr)
            # The kernel prints each 32-bit word in host byte order.
            words = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, width, 4))
            found.add(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.parametrize("which", ["job store", "lab store"])
def test_a_runs_store_listens_on_its_own_address_only(which):
    # TCPStore's own server listens on every interface whatever host it is given: a store meant
    # for loopback would be reachable from the machine's networks too.
    if which == "job store":
        from aidc.burnin.launch.store import JobStore

        with JobStore("127.0.0.1", timeout_s=10) as store:
            assert listening_addresses(store.port) == {"127.0.0.1"}
    else:
        from aidc.burnin.runner import _start_store

        store = _start_store(None, 10)
        assert listening_addresses(store.port) == {"127.0.0.1"}


@pytest.mark.slow
def test_the_lab_launcher_burns_in_only_the_named_nodes_and_certifies_only_them(tmp_path):
    from aidc.audit.log import AuditLog

    spec = parse_spec({
        "name": "mini", "device_backend": "sim", "scheduler": "lab",
        "node_pools": [{"name": "n", "count": 3, "gpu_model": "SIM", "gpus_per_node": 1}],
        "agent": {"device_timeout_s": 2.0},
        "policy": {"burnin": {"fleet_tolerance": 0.95, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
                              "allreduce_min_bytes": 4096, "allreduce_max_bytes": 8192, "train_steps": 5,
                              "min_busbw_fraction": 0.0, "busbw_fleet_tolerance": 0.99, "storage_bytes": 1 << 20,
                              "storage_files": 5, "storage_tolerance": 0.99}},
    })
    with AuditLog(tmp_path / "audit.db") as audit:
        result = launcher_for("lab").run(spec, select_nodes(spec, "n-2,n-0"), lab_dir=tmp_path / "lab", audit=audit,
                                         progress=False, timeout_s=240, say=lambda msg: None)
        certs = audit.records(kind="burnin.certificate")
    assert result.job_id is None and list(result.report.nodes) == ["n-0", "n-2"]
    assert result.report.fleet["collective_ranks"] == 2
    assert sorted((r.node, r.payload["launcher"]["name"]) for r in certs) == [("n-0", "lab"), ("n-2", "lab")]
