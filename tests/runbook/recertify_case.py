"""The recertification case the lab and Slurm end-to-end tests share: a runbook that quarantines,
burns in and releases, a small burn-in policy, and a stored baseline below anything the simulated
GPUs measure (verdicts on timing are specified in tests/burnin/test_baselines.py, not there)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml

RECERTIFY = """
name: recertify
title: Recertify
summary: Take the node out, burn it in alone, give it back only when it certifies.
trigger: {alerts: [{alertname: Recertify}]}
guards: [{guard: node_known}, {guard: blast_radius}]
steps:
  - {id: out, kind: quarantine, reason: "fault on ${node}"}
  - {id: burn-in, kind: burnin, tests: [gemm, memcpy, allreduce], timeout_s: 400}
  - {id: back, kind: release, reason: "recertified"}
on_failure:
  - {id: tell, kind: notify, message: "recertification of ${node} failed"}
"""
LOW = {"schema": 1, "revision": 1, "models": {"SIM": {"metrics": {"gemm_fp32_tflops": 1e-6, "memcpy_gbps": 1e-6}}}}


def write_stack(directory: Path, name: str, scheduler: str, **sections) -> Path:
    """Pulumi.<name>.yaml: the lab's node pool, policy auto-approving the runbook's steps."""
    spec = {"name": name, "device_backend": "sim", "scheduler": scheduler,
            "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1}],
            "policy": {"max_unavailable": 1, "runbook_auto_approve": ["quarantine", "release", "burnin"],
                       "burnin": {"fleet_tolerance": 0.95, "gemm_size": 64, "repeats": 1, "memcpy_bytes": 1 << 20,
                                  "allreduce_min_bytes": 4096, "allreduce_max_bytes": 16384, "train_steps": 10,
                                  "min_busbw_fraction": 0.25, "storage_bytes": 1 << 20, "storage_files": 10}},
            **sections}
    path = directory / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump({"config": {"aidc:cluster": spec}}))
    return path


def prepare(aidc_cli, tmp_path: Path, stack: Path, lab: Path, node: str, *, inject_sdc_gpu: int | None = None,
            baselines: dict | None = LOW) -> list[str]:
    """Install the stack in `lab`, store `baselines`, inject SDC where asked; the runbook command's
    arguments (after `runbook run`)."""
    from aidc.burnin.runner import lab_node_dirs
    from aidc.installation import record
    from aidc.spec import load_stack

    spec = load_stack(str(stack))
    lab.mkdir(parents=True, exist_ok=True)
    dirs = lab_node_dirs(spec, lab)
    record(lab, spec, str(stack))
    if baselines is not None:
        (lab / "burnin-baselines.json").write_text(json.dumps(baselines))
    if inject_sdc_gpu is not None:
        out = aidc_cli("device", "inject", str(dirs[node]), "sdc", "--gpu", str(inject_sdc_gpu))
        assert out.returncode == 0, out.stderr
    rb_dir = tmp_path / "runbooks"
    rb_dir.mkdir(exist_ok=True)
    (rb_dir / "recertify.yaml").write_text(textwrap.dedent(RECERTIFY))
    return ["recertify", "--node", node, "--stack", str(stack), "--runbooks", str(rb_dir),
            "--state-db", str(tmp_path / "state.db"), "--audit-db", str(tmp_path / "audit.db"),
            "--lab-dir", str(lab), "--json"]
