"""/etc/nccl.conf, gres.conf and the Slurm health check rendered by the roles match the spec
(lab and an HGX H100 stack).

The H100 node is played by a sysfs fixture (8 H100 GPUs by PCI id, 4 NVSwitches, 8 mlx5 HCAs)
that preflight scans instead of /sys, so the GPU-guarded paths run for real on the sandbox.
Expected contents are built here from the spec objects, not copied from the templates.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aidc.spec import load_stack
from ansible_sandbox import H100_STACK, ROOT, fake_sysfs

pytestmark = pytest.mark.slow

RENDER_TAGS = ("nccl", "slurm_node")
FAKE_SYS = "/srv/aidc-fake-sys"  # inside the sandbox


def nccl_settings(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def gres_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def h100_node(make_target):
    target = make_target(H100_STACK, "h100-7", preflight_sysfs_root=FAKE_SYS)
    fake_sysfs(target.sandbox.written(FAKE_SYS))
    result = target.converge(tags=RENDER_TAGS)
    return target, result


def test_h100_node_nccl_conf_names_every_rail_hca_and_the_topology_file(h100_node):
    target, result = h100_node
    assert result.ok, result.describe() + result.stdout[-3000:]
    fabric = load_stack(H100_STACK).fabric
    settings = nccl_settings(target.sandbox.written("/etc/nccl.conf").read_text())
    assert settings == {
        "NCCL_SOCKET_IFNAME": fabric.socket_ifname,
        "NCCL_IB_DISABLE": "0",
        "NCCL_IB_HCA": "=" + ",".join(f"{hca}:1" for hca in fabric.hcas),
        "NCCL_TOPO_FILE": fabric.topology_file,
    }
    assert len(fabric.hcas) == fabric.rails == 8


def test_h100_node_gres_conf_lists_the_eight_gpus_found(h100_node):
    target, result = h100_node
    assert result.ok, result.describe()
    pool = load_stack(H100_STACK).node_pools[0]
    assert gres_lines(target.sandbox.written("/etc/slurm/gres.conf").read_text()) == [
        "AutoDetect=nvml",  # NVIDIA GPUs: slurmd asks NVML, and checks the explicit line against it
        f"NodeName=h100-7 Name=gpu Type={pool.gpu_model.lower()} File=/dev/nvidia[0-{pool.gpus_per_node - 1}]"]


def test_h100_node_runs_the_gpu_and_nvswitch_guarded_concerns(h100_node):
    _, result = h100_node
    # With --tags nccl,slurm_node only those roles (and preflight, tagged always) run; none of
    # their tasks may be skipped for lack of hardware, and the package tasks say why they skip.
    skipped = {t.task for t in result.skipped_tasks}
    assert "Check that the GPUs found match the spec (count and model)" not in skipped
    assert "Check that the HCAs the spec names exist on this host" not in skipped
    assert "Install NCCL of the spec's version" in skipped  # aidc_manage_packages is false here


def test_a_node_with_a_missing_gpu_fails_preflight_naming_the_node_and_both_counts(make_target):
    target = make_target(H100_STACK, "h100-3", preflight_sysfs_root=FAKE_SYS)
    fake_sysfs(target.sandbox.written(FAKE_SYS), gpus=7)
    result = target.converge(tags=RENDER_TAGS)
    assert not result.ok
    [failure] = result.failed_tasks
    assert failure.task == "Check that the GPUs found match the spec (count and model)"
    assert "h100-3" in failure.detail and "8 x H100" in failure.detail and "7 GPU(s)" in failure.detail
    assert not target.sandbox.written("/etc/nccl.conf").exists()


def test_lab_node_under_slurm_gets_gres_conf_with_the_spec_count_and_no_ib(make_target):
    stack = ROOT / "Pulumi.lab.yaml"
    target = make_target(stack, "gpu-2", aidc_scheduler="slurm")
    result = target.converge(tags=RENDER_TAGS)
    assert result.ok, result.describe()
    pool = load_stack(stack).node_pools[0]
    assert gres_lines(target.sandbox.written("/etc/slurm/gres.conf").read_text()) == [
        "AutoDetect=off",  # simulated GPUs: nothing for NVML to find
        f"NodeName=gpu-2 Name=gpu Type={pool.gpu_model.lower()} File=/dev/nvidia[0-{pool.gpus_per_node - 1}]"]
    assert nccl_settings(target.sandbox.written("/etc/nccl.conf").read_text())["NCCL_IB_DISABLE"] == "1"


@pytest.fixture(scope="module")
def slurm_lab_node(make_target):
    """A lab node under Slurm whose site slurm.conf exists already: converge, converge again, check+diff."""
    stack = ROOT / "Pulumi.lab.yaml"
    target = make_target(stack, "gpu-2", aidc_scheduler="slurm")
    site_conf = target.sandbox.written("/etc/slurm/slurm.conf")
    site_conf.parent.mkdir(parents=True, exist_ok=True)
    site_conf.write_text("ClusterName=lab\nSlurmctldHost=ctl\n")
    runs = [target.converge(tags=("slurm_node",)) for _ in range(2)]
    runs.append(target.converge(tags=("slurm_node",), check=True, diff=True))
    return target, runs


def test_slurm_runs_aidc_health_check_with_the_specs_interval_and_node_state(slurm_lab_node):
    target, (first, _, _) = slurm_lab_node
    assert first.ok, first.describe()
    slurm = load_stack(ROOT / "Pulumi.lab.yaml").slurm
    settings = nccl_settings(target.sandbox.written("/etc/slurm/aidc-health-check.conf").read_text())
    assert settings == {"HealthCheckProgram": "/usr/local/sbin/aidc-health-check",
                        "HealthCheckInterval": str(slurm.health_check_interval_s),
                        "HealthCheckNodeState": slurm.health_check_node_state}
    assert target.sandbox.written("/etc/slurm/slurm.conf").read_text().splitlines() == [
        "ClusterName=lab", "SlurmctldHost=ctl", "Include /etc/slurm/aidc-health-check.conf"]
    wrapper = target.sandbox.written("/usr/local/sbin/aidc-health-check")
    assert wrapper.stat().st_mode & 0o777 == 0o755
    # Slurm passes no arguments: the wrapper names the node and the spec the agent role installs.
    assert wrapper.read_text().splitlines()[-1] == (
        "exec /opt/aidc/venv/bin/aidc health check --node gpu-2 --stack /etc/aidc/stack.yaml")


def test_slurm_node_converges_idempotently_and_check_mode_agrees(slurm_lab_node):
    _, (_, second, check) = slurm_lab_node
    assert second.ok and second.changed_tasks == [], second.describe()
    assert check.ok and check.changed_tasks == [], check.describe()


def test_the_health_check_wrapper_runs_aidc_with_what_slurm_would_give_it(tmp_path):
    """The rendered wrapper, run as slurmd runs it (no arguments), against a healthy and a faulty
    simulated node: exit 0, then 1 with the reason."""
    import json
    import os
    import subprocess
    import sys

    from aidc.device.sim import create_node, inject

    node = create_node(tmp_path / "gpu-2", "gpu-2", gpus=2)
    aidc = tmp_path / "aidc"
    aidc.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT / 'agents'} exec {sys.executable} -m aidc \"$@\"\n")
    aidc.chmod(0o755)
    wrapper = tmp_path / "aidc-health-check"
    template = ROOT / "playbooks" / "roles" / "slurm_node" / "templates" / "aidc-health-check.j2"
    variables = {"slurm_node_aidc": str(aidc), "aidc_node_name": "gpu-2", "slurm_node_spec_file": "lab",
                 "slurm_node_health_check_extra_args": f"--backend sim --node-dir {node}"}
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.template",
         "-a", f"src={template} dest={wrapper} mode=0755", "-e", f"@{tmp_path / 'vars.json'}",
         "-e", f"ansible_python_interpreter={sys.executable}"],
        env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah")}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    healthy = subprocess.run([str(wrapper)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "gpu-2: healthy"), healthy.stderr
    inject(node, "xid", 1, xid=79)
    faulty = subprocess.run([str(wrapper)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert faulty.returncode == 1 and faulty.stdout.startswith("gpu-2: unhealthy: GPU 1 lost")


def test_roce_fabric_nccl_conf_sets_the_gid_index(tmp_path):
    """The role's own template rendered by Ansible (ad hoc, into a temporary file) for a RoCE spec."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from aidc.inventory import cluster_vars
    from aidc.spec import parse_spec

    spec = parse_spec({"name": "roce", "node_pools": [{"name": "a", "count": 1, "gpu_model": "H200",
                                                       "gpus_per_node": 8}],
                       "fabric": {"kind": "roce", "rails": 2, "hcas": ["mlx5_0", "mlx5_3"], "gid_index": 3,
                                  "socket_ifname": "eth0"}})
    variables = {**cluster_vars(spec), "nccl_hcas": spec.fabric.hcas, "nccl_overrides": {}}  # the role default
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    template = ROOT / "playbooks" / "roles" / "nccl" / "templates" / "nccl.conf.j2"
    dest = tmp_path / "nccl.conf"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.template",
         "-a", f"src={template} dest={dest}", "-e", f"@{tmp_path / 'vars.json'}",
         "-e", f"ansible_python_interpreter={sys.executable}"],
        env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah")}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert nccl_settings(dest.read_text()) == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "0",
                                               "NCCL_IB_HCA": "=mlx5_0:1,mlx5_3:1", "NCCL_IB_GID_INDEX": "3"}
