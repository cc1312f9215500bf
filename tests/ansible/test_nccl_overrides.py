"""The `nccl` role takes measured settings (`aidc_nccl_overrides`, as bench/nccl_sweep.py writes
them) into /etc/nccl.conf after the spec's lines, and refuses overrides it must not write.
Real Ansible: the role's own template and its own check task, run on localhost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from aidc.inventory import cluster_vars
from aidc.spec import parse_spec
from ansible_sandbox import ROOT

ROLE = ROOT / "playbooks" / "roles" / "nccl"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
BIN = Path(sys.executable).parent
SPEC = parse_spec({"name": "ib", "node_pools": [{"name": "a", "count": 1, "gpu_model": "H200", "gpus_per_node": 8}],
                   "fabric": {"kind": "infiniband", "rails": 2, "hcas": ["mlx5_0", "mlx5_1"], "socket_ifname": "eth0"}})


def _ansible(tmp_path: Path, args: list[str], variables: dict) -> subprocess.CompletedProcess:
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    return subprocess.run([*args, "-e", f"@{tmp_path / 'vars.json'}", "-e", f"ansible_python_interpreter={sys.executable}"],
                          env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah"), "ANSIBLE_NOCOLOR": "1"},
                          capture_output=True, text=True, timeout=180)


def settings(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_measured_overrides_from_the_sweep_are_rendered_after_the_spec_settings(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from nccl_sweep import write_proposal
    finally:
        sys.path.remove(str(ROOT / "bench"))
    result = {"best": {"NCCL_PROTO": "Simple", "NCCL_MIN_NCHANNELS": "16"}, "baseline_gbps": 300.0,
              "best_gbps": 340.0, "rows": [], "trials": 2, "min_gain": 0.05}
    overrides = json.loads(write_proposal(tmp_path / "out", result, "h")["overrides"].read_text())
    dest = tmp_path / "nccl.conf"
    proc = _ansible(tmp_path, [str(BIN / "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.template",
                               "-a", f"src={ROLE / 'templates' / 'nccl.conf.j2'} dest={dest}"],
                    {**cluster_vars(SPEC), "nccl_hcas": SPEC.fabric.hcas, **overrides,
                     "nccl_overrides": DEFAULTS["nccl_overrides"]})  # the role's default: from aidc_nccl_overrides
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in dest.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["NCCL_SOCKET_IFNAME=eth0", "NCCL_IB_DISABLE=0", "NCCL_IB_HCA==mlx5_0:1,mlx5_1:1",
                     "NCCL_MIN_NCHANNELS=16", "NCCL_PROTO=Simple"]


def test_the_role_refuses_an_override_of_a_spec_setting_or_a_value_with_a_line_break(tmp_path):
    playbook = tmp_path / "check.yml"
    playbook.write_text(yaml.safe_dump([{"hosts": "localhost", "connection": "local", "gather_facts": False,
                                         "vars_files": [str(ROLE / "defaults" / "main.yml")],
                                         "tasks": [{"ansible.builtin.import_tasks": str(ROLE / "tasks" / "overrides.yml")}]}]))
    run = [str(BIN / "ansible-playbook"), "-i", "localhost,", str(playbook)]
    good = _ansible(tmp_path, run, {"aidc_nccl_overrides": {"NCCL_ALGO": "Tree", "NCCL_MIN_NCHANNELS": 16}})
    assert good.returncode == 0, good.stdout + good.stderr
    none = _ansible(tmp_path, run, {})  # a cluster that has measured nothing
    assert none.returncode == 0, none.stdout + none.stderr
    spec_key = _ansible(tmp_path, run, {"aidc_nccl_overrides": {"NCCL_IB_HCA": "mlx5_9"}})
    assert spec_key.returncode != 0 and "aidc_nccl_overrides NCCL_IB_HCA: mlx5_9 is refused" in spec_key.stdout
    injected = _ansible(tmp_path, run, {"aidc_nccl_overrides": {"NCCL_ALGO": "Ring\nNCCL_IB_DISABLE=1"}})
    assert injected.returncode != 0 and "aidc_nccl_overrides NCCL_ALGO" in injected.stdout
