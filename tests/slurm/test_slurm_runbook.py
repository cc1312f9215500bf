"""`aidc runbook run <name> --stack <a slurm stack>`: runbook steps drain and resume through the
real Slurm, and a node an operator drained is not resumed by a runbook either."""

from __future__ import annotations

import json
import textwrap

from aidc.audit import AuditLog
from aidc.failover.slurm import drain_reason
from aidc.installation import record
from aidc.spec import load_stack

from .slurm_helpers import drains_issued, reason, write_stack

OUT_AND_BACK = """
name: out-and-back
title: Drain and resume
summary: Take the node out, check Slurm agrees, give it back.
trigger: {alerts: [{alertname: OutAndBack}]}
guards: [{guard: node_known}, {guard: blast_radius}]
steps:
  - {id: out, kind: quarantine, reason: "runbook test on ${node}"}
  - {id: is-out, kind: check, source: scheduler, expect: quarantined}
  - {id: back, kind: release, reason: "test done"}
  - {id: is-back, kind: check, source: scheduler, expect: in_service}
"""


def _run(aidc_cli, tmp_path, stack, node):
    rb_dir = tmp_path / "runbooks"
    rb_dir.mkdir(exist_ok=True)
    (rb_dir / "out-and-back.yaml").write_text(textwrap.dedent(OUT_AND_BACK))
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    record(site, load_stack(str(stack)), str(stack))  # the installation a live run takes its roles from
    return aidc_cli("runbook", "run", "out-and-back", "--node", node, "--stack", str(stack), "--runbooks",
                    str(rb_dir), "--state-db", str(tmp_path / "state.db"), "--audit-db", str(tmp_path / "audit.db"),
                    "--lab-dir", str(site), "--json")


def test_runbook_run_drains_and_resumes_through_slurm(aidc_cli, local_slurm, tmp_path):
    stack = write_stack(local_slurm, tmp_path)
    out = _run(aidc_cli, tmp_path, stack, "gpu-3")
    assert out.returncode == 0, out.stdout + out.stderr
    run = json.loads(out.stdout)
    assert run["status"] == "done"
    assert [(s["step_id"], s["status"]) for s in run["steps"]] == [
        ("out", "done"), ("is-out", "done"), ("back", "done"), ("is-back", "done")]
    assert run["steps"][2]["result"]["decision"]["decision"] == "released"
    assert drains_issued(local_slurm, "gpu-3") == 1 and reason(local_slurm, "gpu-3") == "none"
    assert local_slurm.node_states()["gpu-3"].startswith("idle")
    commands = [r.payload["argv"][3] for r in AuditLog(tmp_path / "audit.db").records(kind="slurm.command")]
    assert commands == ["State=DRAIN", "State=RESUME"]
    log = (local_slurm.root / "log" / "slurmctld.log").read_text(errors="replace")
    written, _ = drain_reason("runbook test on gpu-3", f"run-{run['id']}", "gpu-3")
    assert f"reason set to: {written}" in log


def test_a_runbook_does_not_resume_a_node_an_operator_drained(aidc_cli, local_slurm, tmp_path):
    local_slurm.run("scontrol", "update", "NodeName=gpu-0", "State=DRAIN", "Reason=firmware update")
    out = _run(aidc_cli, tmp_path, write_stack(local_slurm, tmp_path), "gpu-0")
    assert out.returncode == 1
    back = next(s for s in json.loads(out.stdout)["steps"] if s["step_id"] == "back")
    assert back["status"] == "failed" and back["result"]["decision"]["decision"] == "operator_drain"
    assert reason(local_slurm, "gpu-0") == "firmware update" and local_slurm.node_states()["gpu-0"] == "drained"


def test_a_kubernetes_stack_without_credentials_is_one_clear_error(aidc_cli, tmp_path):
    import os

    import yaml

    stack = tmp_path / "Pulumi.k.yaml"
    stack.write_text(yaml.safe_dump({"config": {"aidc:cluster": {
        "name": "k", "scheduler": "kubernetes",
        "node_pools": [{"name": "gpu", "count": 1, "gpu_model": "SIM", "gpus_per_node": 1}]}}}))
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(tmp_path / "no-such-kubeconfig")
    out = aidc_cli("runbook", "run", "agent-down", "--node", "gpu-0", "--stack", str(stack),
                   "--state-dir", str(tmp_path), "--state-db", str(tmp_path / "s.db"),
                   "--audit-db", str(tmp_path / "a.db"), env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "aidc: error: no Kubernetes credentials" in out.stderr


def test_with_slurmctld_down_a_runbook_quarantine_fails_closed_with_a_clear_reason(aidc_cli, local_slurm, tmp_path):
    stack = write_stack(local_slurm, tmp_path, timeout_s=1.0)
    local_slurm.stop_daemon("slurmctld")
    out = _run(aidc_cli, tmp_path, stack, "gpu-1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    run = json.loads(out.stdout)
    assert run["status"] == "failed"
    assert "blast radius unknown: cannot read the out-of-service nodes" in run["error"]
    assert "did not answer within 1 s (is slurmctld up?)" in run["error"]
    local_slurm.start_daemon("slurmctld")
    local_slurm.wait_states({"gpu-1": "idle"})  # nothing was drained
    assert reason(local_slurm, "gpu-1") == "none"
