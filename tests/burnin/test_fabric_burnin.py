"""Burn-in across the lab's netns fabric: real namespaces, shaped rails, gloo over them.

Each test builds its own fabric, runs one burn-in, and removes the fabric."""

import random
import re
import subprocess

import pytest

from aidc.audit.log import AuditLog
from aidc.burnin.runner import run_burnin
from aidc.device.sim import create_node
from aidc.errors import BurninError
from aidc.lab import fabric
from aidc.spec import parse_spec

from tests.burnin.test_lab_burnin import burnin_processes, run_dir  # noqa: F401  (fixture)


def fabric_spec(nodes: int, **burnin):
    return parse_spec({
        "name": "netlab", "device_backend": "sim", "scheduler": "lab",
        "node_pools": [{"name": "n", "count": nodes, "gpu_model": "SIM", "gpus_per_node": 1}],
        "fabric": {"kind": "netns", "rails": 2, "link_speed_gbps": 10, "socket_ifname": "rail0,rail1"},
        "lab": {"fabric_rail_mbit": 200},
        "agent": {"device_timeout_s": 1.0},
        # Storage noise is not under test here (nodes share one disk): a wide tolerance. The fleet
        # tolerance is also the pair tests' (a pair more than it below the median is slow). A node's
        # busbw inside a collective carries every rank's scheduling noise on this shared host: the
        # busbw fleet rule is specified on figures (test_judge.py), a bad rail by localisation here.
        "policy": {"burnin": {"fleet_tolerance": 0.5, "busbw_fleet_tolerance": 0.9, "storage_tolerance": 0.95, "storage_bytes": 1 << 20,
                              "storage_files": 20, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
                              "allreduce_min_bytes": 1 << 20, "allreduce_max_bytes": 4 << 20, "train_steps": 10,
                              **burnin}},
    })


@pytest.fixture
def lab(tmp_path):
    why = fabric.probe_namespaces("aidctestprobe")
    if why is not None:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    made = []

    def build(spec):
        lab_dir = tmp_path / "lab"
        dirs = {n.name: create_node(lab_dir / "nodes" / n.name, n.name, n.gpus, i) for i, n in enumerate(spec.nodes())}
        made.append(lab_dir)
        return fabric.ensure(spec, lab_dir, say=lambda _: None), dirs

    yield build
    for lab_dir in made:
        fabric.teardown(lab_dir)


@pytest.mark.slow
def test_a_degraded_rail_on_a_random_node_fails_that_nodes_certificate_with_node_rail_and_fraction(
        tmp_path, lab, run_dir):  # noqa: F811
    spec = fabric_spec(4)
    built, dirs = lab(spec)
    victim, rail = random.choice(sorted(dirs)), random.randrange(2)
    fabric.inject_link(dirs[victim], rail, rate=0.3)
    with AuditLog(tmp_path / "audit.db") as audit:
        report = run_burnin(spec, dirs, audit, timeout_s=240, fabric=built)
        certs = {r.node: r.payload for r in audit.records(kind="burnin.certificate")}

    where = f"degraded {victim} rail {rail}"
    assert report.verdicts == {n: "fail" if n == victim else "pass" for n in dirs}, (where, report.reasons)
    # The localised rail is the victim's reason; on this shared host another of its figures may
    # also miss the fleet by chance (seen once in CI), which fails the same node, so is no error.
    localised = [r for r in report.nodes[victim].reasons if r.startswith(f"{victim} rail")]
    assert len(localised) == 1, (where, report.nodes[victim].reasons)
    (reason,) = localised
    measured = re.fullmatch(rf"{victim} rail {rail}: busbw (\d+)% of link rate \(fleet median (\d+)%\)", reason)
    assert measured, (where, reason)
    assert 10 <= int(measured[1]) <= 40 < 60 <= int(measured[2])  # ~30% of the link against a healthy fleet
    local = report.fleet["localisation"]
    assert local["ran"] and local["fleet_fraction"] < spec.policy.burnin.localise_below_fraction
    assert local["pair_tests"] <= 2 * (4 + 2)  # ring pairs per rail, plus a bisection at most: O(N)
    assert certs[victim]["verdict"] == "fail" and reason in certs[victim]["reasons"]
    assert certs[victim]["reasons"] == report.nodes[victim].reasons
    assert all(certs[n]["verdict"] == "pass" for n in dirs if n != victim)
    # The scaled rail rate, recorded with the scale: 0.2 Gbit/s = 0.025 GB/s (bus bandwidth's unit).
    assert report.fleet["link_rate_gbit_s"] == pytest.approx(0.2) and report.fleet["link_rate_gbps"] == pytest.approx(0.025)
    assert report.fleet["fabric"] == {"kind": "netns", "rails": 2, "spec_link_gbps": 10.0, "scale": 0.02,
                                      "rail_mbit": 200.0}
    assert burnin_processes(run_dir) == {}


@pytest.mark.slow
def test_a_rail_that_is_down_fails_its_node_with_the_reason_and_the_rest_are_certified(tmp_path, lab, run_dir):  # noqa: F811
    # At 64 KiB the collectives are latency-bound (busbw near the policy floor, by chance either
    # side): the floor is for a full sweep's largest sizes, and is not what this test is about.
    spec = fabric_spec(3, allreduce_min_bytes=4096, allreduce_max_bytes=65536, localise_below_fraction=0.01,
                       min_busbw_fraction=0)
    built, dirs = lab(spec)
    fabric.inject_link(dirs["n-1"], 1, down=True)
    report = run_burnin(spec, dirs, None, timeout_s=120, fabric=built)
    assert report.verdicts == {"n-0": "pass", "n-1": "fail", "n-2": "pass"}, report.reasons
    assert report.nodes["n-1"].reasons == ["n-1 rail 1: link down (rail1 has no carrier)"]
    assert report.fleet["collective_ranks"] == 2  # the collectives ran without it rather than wait for it
    assert burnin_processes(run_dir) == {}


@pytest.mark.slow
def test_a_node_that_never_joins_is_named_not_waited_for(tmp_path, lab, run_dir):  # noqa: F811
    spec = fabric_spec(3, allreduce_min_bytes=4096, allreduce_max_bytes=65536)
    built, dirs = lab(spec)
    # Its management link (the way to the rendezvous store) is cut: it can never join.
    subprocess.run(["ip", "-n", built.nodes["n-2"].netns, "link", "set", "mgmt0", "down"], check=True)
    with AuditLog(tmp_path / "audit.db") as audit:
        with pytest.raises(BurninError, match=r"node\(s\) n-2 never joined the burn-in rendezvous within 10 s"):
            run_burnin(spec, dirs, audit, timeout_s=120, fabric=built, join_timeout_s=10)
        (aborted,) = audit.records(kind="burnin.aborted")
    assert "n-2 never joined" in aborted.reason
    assert burnin_processes(run_dir) == {}


@pytest.mark.slow
def test_a_rail_that_goes_down_mid_run_ends_the_run_at_the_collective_timeout_naming_the_rail(
        tmp_path, lab, run_dir):  # noqa: F811
    import threading
    import time

    spec = fabric_spec(3, allreduce_min_bytes=1 << 20, allreduce_max_bytes=4 << 20, repeats=3)
    built, dirs = lab(spec)
    outcome = {}

    def burn_in():
        try:
            run_burnin(spec, dirs, None, timeout_s=30, fabric=built)
        except BurninError as exc:
            outcome["error"] = str(exc)

    runner_thread = threading.Thread(target=burn_in)
    runner_thread.start()
    for _ in range(600):  # until the node processes exist (bounded: 60 s): past the pre-flight check
        if len(burnin_processes(run_dir)) >= 4:  # the zygote and its three workers
            break
        time.sleep(0.1)
    fabric.inject_link(dirs["n-1"], 0, down=True)
    runner_thread.join(timeout=120)
    assert not runner_thread.is_alive()  # bounded by the collectives' timeout, not a hang
    assert "rails down now: n-1 rail 0: link down (rail0 has no carrier)" in outcome["error"]
    assert burnin_processes(run_dir) == {}
