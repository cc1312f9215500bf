"""`aidc runbook ...` as a user runs it (subprocesses), against a lab of simulated nodes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aidc.device.sim import create_node
from aidc.failover.scheduler import LabScheduler
from aidc.installation import record
from aidc.runbook.state import RunState
from aidc.spec import load_stack
from runbook_fakes import write_runbook

ROOT = Path(__file__).resolve().parents[2]
LAB_NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]


@pytest.fixture
def lab(tmp_path):
    for i, name in enumerate(LAB_NODES):
        create_node(tmp_path / "lab" / "nodes" / name, name, 2, i)
    record(tmp_path / "lab", load_stack("lab"), "lab")  # installed, as `aidc lab run` does
    return tmp_path


def opts(lab: Path) -> list[str]:
    return ["--lab-dir", str(lab / "lab"), "--state-db", str(lab / "state.db"), "--audit-db", str(lab / "audit.db")]


def test_list_shows_every_shipped_runbook(aidc_cli):
    out = aidc_cli("runbook", "list", "--json", check=True)
    names = [r["name"] for r in json.loads(out.stdout)]
    assert names == sorted(p.stem for p in (ROOT / "runbooks").glob("*.yaml"))


def test_show_prints_the_runbook_for_humans(aidc_cli):
    out = aidc_cli("runbook", "show", "ecc-row-remap", check=True)
    assert "# Double-bit ECC error or row-remap failure" in out.stdout and "## Steps" in out.stdout


def test_dry_run_prints_each_step_and_changes_nothing(aidc_cli, lab):
    out = aidc_cli("runbook", "run", "gpu-fallen-off-bus", "--node", "gpu-1", "--dry-run", *opts(lab))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "DRY RUN of gpu-fallen-off-bus on gpu-1: nothing will be changed"
    assert len(lines) == 1 + 11  # ten steps and the hand-over
    assert any("would take gpu-1 out of service through the lab scheduler" in line for line in lines)
    assert any("would run playbook reboot-node.yml limited to gpu-1" in line for line in lines)
    assert LabScheduler(lab / "lab").state("gpu-1") == "in_service"
    assert RunState(lab / "state.db").runs() == []
    audit = json.loads(aidc_cli("audit", "show", "--db", str(lab / "audit.db"), "--json", check=True).stdout)
    assert len(audit) == 11 and {r["kind"] for r in audit} == {"runbook.dry_run.step"}


def test_dry_run_as_json(aidc_cli, lab):
    out = aidc_cli("runbook", "run", "agent-down", "--node", "gpu-2", "--dry-run", "--json", *opts(lab), check=True)
    doc = json.loads(out.stdout)
    assert doc["dry_run"] is True and [s["kind"] for s in doc["steps"]][:2] == ["wait", "playbook"]


def test_a_real_run_quarantines_through_the_lab_scheduler(aidc_cli, lab, tmp_path):
    rb_dir = tmp_path / "rb"
    rb_dir.mkdir()
    write_runbook(rb_dir, """
        name: drain-now
        title: Drain now
        summary: Quarantine the node and say so.
        trigger: {alerts: [{alertname: DrainNow}]}
        steps:
          - {id: out, kind: quarantine, reason: "drained by hand"}
          - {id: is-out, kind: check, source: scheduler, expect: quarantined}
          - {id: tell, kind: notify, message: "${node} drained (run ${run_id})"}
        """)
    out = aidc_cli("runbook", "run", "drain-now", "--node", "gpu-3", "--runbooks", str(rb_dir), "--json",
                   "--notify-file", str(tmp_path / "notify.jsonl"), *opts(lab))
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout)
    assert run["status"] == "done" and [s["status"] for s in run["steps"]] == ["done"] * 3
    assert LabScheduler(lab / "lab").state("gpu-3") == "quarantined"
    assert json.loads((tmp_path / "notify.jsonl").read_text())["node"] == "gpu-3"
    again = aidc_cli("runbook", "run", "drain-now", "--node", "gpu-3", "--runbooks", str(rb_dir), *opts(lab))
    assert again.returncode == 1 and "cooldown" in again.stdout
    runs = json.loads(aidc_cli("runbook", "runs", "--state-db", str(lab / "state.db"), "--json", check=True).stdout)
    assert [(r["runbook"], r["status"]) for r in runs] == [("drain-now", "done")]


def test_bad_input_is_a_clear_error_not_a_traceback(aidc_cli, lab):
    for args, message in [
        (("run", "no-such-runbook", "--node", "gpu-1"), "no runbook named 'no-such-runbook'"),
        (("run", "gpu-fallen-off-bus", "--node", "gpu-99"), "'gpu-99' is not a node"),
        (("run", "gpu-fallen-off-bus", "--node", "gpu-1", "--label", "oops"), "--label expects KEY=VALUE"),
        (("run", "ecc-row-remap", "--node", "gpu-1", "--label", "gpu=0 --other-flag", "--dry-run"),
         "gpu: '0 --other-flag' is not an integer"),
    ]:
        out = aidc_cli("runbook", *args, *opts(lab))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_serve_refuses_to_start_without_a_token_or_mutual_tls(aidc_cli, lab):
    out = aidc_cli("runbook", "serve", "--port", "0", *opts(lab), env={k: v for k, v in os.environ.items() if k != "AIDC_RUNBOOK_TOKEN"})
    assert out.returncode == 2 and "authentication is required" in out.stderr
    assert "--token-file" in out.stderr and "--client-ca" in out.stderr  # says both ways out


def test_the_committed_markdown_matches_the_runbooks(aidc_cli, tmp_path):
    aidc_cli("runbook", "render", "--out", str(tmp_path / "md"), check=True)
    committed = ROOT / "docs" / "runbooks"
    rendered = sorted(p.name for p in (tmp_path / "md").iterdir())
    assert rendered == sorted(p.name for p in committed.glob("*.md"))
    for name in rendered:
        assert (tmp_path / "md" / name).read_text() == (committed / name).read_text(), \
            f"docs/runbooks/{name} is stale: run `aidc runbook render`"
