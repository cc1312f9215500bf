"""Helpers for tests against the private Slurm (fixture `local_slurm`): a stack file that points
aidc at it, and readers of what Slurm and slurmctld's own log say."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from aidc.spec import load_stack


def write_stack(local_slurm, directory: Path, timeout_s: float = 3.0, bin_dir: str | None = None,
                **policy) -> Path:
    """Pulumi.<name>.yaml with `scheduler: slurm` and `slurm.conf` at the private cluster's conf.
    The node pool matches the fixture: gpu-0..3 and gpu-spare-0."""
    slurm = {"conf": str(local_slurm.conf), "command_timeout_s": timeout_s}
    if bin_dir:
        slurm["bin_dir"] = bin_dir
    spec = {"name": "slurmtest", "device_backend": "sim", "scheduler": "slurm",
            "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2, "spares": 1}],
            "slurm": slurm,
            "policy": {"max_unavailable": 1, "runbook_auto_approve": ["quarantine", "release"], **policy}}
    path = directory / "Pulumi.slurmtest.yaml"
    path.write_text(yaml.safe_dump({"config": {"aidc:cluster": spec}}))
    return path


def spec_for(local_slurm, directory: Path, **kw):
    return load_stack(write_stack(local_slurm, directory, **kw))


def reason(local_slurm, node: str) -> str:
    """The drain reason Slurm holds for `node` (`sinfo %E`), 'none' when it has none."""
    return local_slurm.run("sinfo", "-h", "-n", node, "-o", "%E").stdout.strip()


def drains_issued(local_slurm, node: str) -> int:
    """How many times slurmctld set a reason on `node`, by its own log: the drains it received."""
    log = (local_slurm.root / "log" / "slurmctld.log").read_text(errors="replace")
    return len(re.findall(rf"update_node: node {re.escape(node)} reason set to", log))
