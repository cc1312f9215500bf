"""What users expect of any mature CLI, as the commands do it: standard input for `-`,
timestamps on records, JSON errors under --json, dry-runs marked, progress on long work."""

from __future__ import annotations

import json
import re

from aidc.audit import AuditLog
from aidc.events import Action, FaultEvent, FaultKind
from aidc.lab.run import TrainingProgress
from aidc.store import Store

XID_79 = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.\n"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_parse_log_dash_reads_the_kernel_log_from_standard_input(aidc_cli):
    out = aidc_cli("health", "parse-log", "-", "--json", input="kernel: eth0 up\n" + XID_79)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["xid"], r["action"], r["line_number"]) for r in rows] == [(79, "reboot_node", 2)]


def test_parse_log_dash_with_nothing_on_standard_input_finds_nothing(aidc_cli):
    out = aidc_cli("health", "parse-log", "-", input="")
    assert out.returncode == 0 and "no GPU faults in <stdin>" in out.stdout


def test_errors_under_json_are_one_json_object_on_stderr_and_stdout_stays_empty(aidc_cli, tmp_path):
    missing = aidc_cli("audit", "verify", "--db", str(tmp_path / "nope.db"), "--json")
    assert missing.returncode == 1 and missing.stdout == ""
    error = json.loads(missing.stderr)
    assert error["exit_code"] == 1 and "no audit database" in error["error"]

    # Usage errors too: no usage box, no traceback, click's exit code 2.
    usage = aidc_cli("burnin", "run", "--timeout", "-5", "--json")
    assert usage.returncode == 2 and usage.stdout == ""
    error = json.loads(usage.stderr)
    assert error["kind"] == "usage" and "--timeout" in error["error"]


def test_errors_without_json_stay_one_line_for_people(aidc_cli, tmp_path):
    missing = aidc_cli("audit", "verify", "--db", str(tmp_path / "nope.db"))
    assert missing.returncode == 1 and missing.stderr.startswith("aidc: error: no audit database")


def test_a_stack_that_does_not_exist_says_how_to_create_it(aidc_cli):
    out = aidc_cli("spec", "check", "--stack", "prod")
    assert out.returncode == 2
    assert "cp Pulumi.h100-example.yaml Pulumi.prod.yaml" in out.stderr and "Traceback" not in out.stderr


def test_audit_show_prints_utc_timestamps_and_marks_dry_runs(aidc_cli, tmp_path):
    db = tmp_path / "audit.db"
    with AuditLog(db) as log:
        log.append("failover.decision", "quarantine gpu-1", actor="t", node="gpu-1", payload={"dry_run": False})
        log.append("failover.decision", "dry-run: would quarantine gpu-2", actor="t", node="gpu-2",
                   payload={"dry_run": True})
    out = aidc_cli("audit", "show", "--db", str(db))
    assert out.returncode == 0, out.stderr
    live, dry = [line for line in out.stdout.splitlines() if "failover.decision" in line]
    assert ISO_UTC.search(live) and ISO_UTC.search(dry)
    assert "[dry-run]" in dry and "[dry-run]" not in live
    as_json = json.loads(aidc_cli("audit", "show", "--db", str(db), "--json").stdout)
    assert [r["dry_run"] for r in as_json if r["kind"] == "failover.decision"] == [False, True]


def test_health_events_prints_when_each_fault_was_observed(aidc_cli, tmp_path):
    store = Store(tmp_path / "state.db")
    store.append(FaultEvent("gpu-1", FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", gpu=0, xid=79,
                            observed_at=1_790_000_000.25))
    store.close()
    out = aidc_cli("health", "events", "--store", str(tmp_path / "state.db"))
    assert out.returncode == 0, out.stderr
    assert "2026-09-21T14:13:20.250Z" in out.stdout and "gpu-1" in out.stdout


def _steps(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_training_progress_says_step_loss_and_membership_and_at_once_when_membership_changes(tmp_path):
    log, said, now = tmp_path / "steps.jsonl", [], [100.0]
    progress = TrainingProgress(log, 200, said.append, every_s=5.0, clock=lambda: now[0])
    progress()
    assert said == []  # nothing trained yet: nothing to say

    _steps(log, {"step": 1, "loss": 2.5, "t": 1, "world": ["gpu-0", "gpu-1"]})
    progress()
    assert said == []  # the log is read at most twice a second
    now[0] += 0.5
    progress()
    assert said == ["training: step 1/200  loss 2.5000  on gpu-0, gpu-1"]

    _steps(log, {"step": 2, "loss": 2.4, "t": 2, "world": ["gpu-0", "gpu-1"]})
    now[0] += 1.0
    progress()
    assert len(said) == 1  # within every_s and nothing new to say beyond a step

    _steps(log, {"step": 3, "loss": 2.3, "t": 3, "world": ["gpu-0", "gpu-spare-0"]})
    now[0] += 1.0
    progress()
    assert said[-1] == "training: step 3/200  loss 2.3000  new membership gpu-0, gpu-spare-0"

    now[0] += 6.0
    progress()
    assert len(said) == 2  # no new step: silence, not a repeated line
