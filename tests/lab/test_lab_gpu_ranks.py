"""One GPU out, the node keeps working: the lab with one training rank per GPU.

Specification: `aidc lab run --ranks gpu` trains one rank per GPU (two per node), injects a
fault the catalog keeps in one GPU (XID 48) on one GPU of the training node through the
simulated device, and failover takes out that GPU's rank only: a spare GPU's rank takes its
slot, the node's other rank is in the next step's membership, and no step is lost (checkpoint
every step). The summary and the audit log say which GPU was taken out and that its node kept
training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def small_stack(path: Path) -> Path:
    """The lab stack made small for 2 shared cores: one training node of 2 GPUs and one spare
    node (4 ranks' agents in all), on loopback, a short job."""
    doc = yaml.safe_load((ROOT / "Pulumi.lab.yaml").read_text())
    cluster = doc["config"]["aidc:cluster"]
    cluster["node_pools"][0].update(count=1, spares=1, gpus_per_node=2)
    cluster["fabric"] = {"kind": "loopback"}
    cluster["lab"].update(train_steps=40, inject_at_step=8, checkpoint_every=1)
    # Loopback between processes on 2 shared cores measures their scheduling, not a link (0.6% of
    # the 12.5 GB/s link seen under load): the floor here only catches a collective that stalls.
    cluster["policy"]["burnin"]["min_busbw_fraction"] = 0.001
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_a_fault_on_one_gpu_takes_out_its_rank_and_the_node_keeps_training(aidc_cli, tmp_path):
    lab_dir = tmp_path / "lab"
    stack = small_stack(tmp_path / "Pulumi.gpu.yaml")
    out = aidc_cli("lab", "run", "--ranks", "gpu", "--stack", str(stack), "--lab-dir", str(lab_dir), "--json",
                   timeout=570)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["ranks"] == "gpu" and summary["xid"] == 48 and summary["victim"] == "gpu-0"
    gpu = summary["victim_gpu"]
    assert summary["node_kept_training"] is True and summary["steps_lost"] == 0
    steps = [json.loads(line) for line in (lab_dir / "train" / "steps.jsonl").read_text().splitlines()]
    before = [s for s in steps if s["step"] < 8]
    assert sorted(before[-1]["world"]) == ["gpu-0/gpu0", "gpu-0/gpu1"]
    last = steps[-1]
    assert last["step"] == 40 and f"gpu-0/gpu{gpu}" not in last["world"]
    assert f"gpu-0/gpu{1 - gpu}" in last["world"]  # the node's other rank trained to the end
    assert any(m.startswith("gpu-spare-0/") for m in last["world"])  # a spare GPU took the slot
    # Failover took the GPU out, not the node, and the record says so.
    records = json.loads((lab_dir / "report" / "report.json").read_text())["records"]
    [action] = [r for r in records if r["kind"] == "failover.action"]
    assert action["node"] == "gpu-0" and action["payload"]["scope"] == "gpu" and action["payload"]["gpu"] == gpu
    assert not (lab_dir / "nodes" / "gpu-0" / "quarantined").exists()
    assert (lab_dir / "nodes" / "gpu-0" / f"quarantined-gpu{gpu}").exists()
    [resumed] = [r for r in records if r["kind"] == "lab.resume"]
    assert resumed["payload"]["taken_out"] == f"gpu-0/gpu{gpu}" and resumed["payload"]["node_kept_training"]
    assert summary["audit_verified"]
    # The report says which GPU left and that its node kept training.
    html = (lab_dir / "report" / "report.html").read_text()
    assert f"gpu-0/gpu{gpu} taken out through lab" in html and f"gpu-0 kept training on gpu-0/gpu{1 - gpu}" in html
