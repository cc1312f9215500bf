"""kill -9 of `aidc runbook serve` in the middle of a runbook: after a restart the run
resumes, and no completed destructive step is repeated."""

from __future__ import annotations

import json

import pytest

from aidc.audit.log import AuditLog
from aidc.device.sim import create_node
from aidc.failover.scheduler import LabScheduler
from aidc.runbook.state import RunState
from runbook_fakes import alert, write_runbook
from serve_proc import ServeProcess, wait_until

DRILL = """
name: crash-drill
title: Crash drill
summary: Quarantine, hold a while (the receiver is killed here), then notify.
trigger: {alerts: [{alertname: CrashDrill}]}
steps:
  - {id: out, kind: quarantine, reason: "crash drill"}
  - {id: hold, kind: wait, seconds: 5}
  - {id: tell, kind: notify, message: "${node} drill done"}
"""


@pytest.mark.slow
def test_kill_9_mid_runbook_then_restart_repeats_no_destructive_step(tmp_path):
    for i, name in enumerate(["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]):
        create_node(tmp_path / "lab" / "nodes" / name, name, 2, i)
    rb_dir = tmp_path / "runbooks"
    rb_dir.mkdir()
    write_runbook(rb_dir, DRILL)
    args = ["--lab-dir", str(tmp_path / "lab"), "--state-db", str(tmp_path / "state.db"),
            "--audit-db", str(tmp_path / "audit.db"), "--runbooks", str(rb_dir)]
    state = RunState(tmp_path / "state.db")
    quarantined_file = tmp_path / "lab" / "nodes" / "gpu-2" / "quarantined"
    first = ServeProcess(tmp_path, "t0ken", args, "serve-1")
    second = ServeProcess(tmp_path, "t0ken", args, "serve-2")
    try:
        first.start()
        payload = {"version": "4", "status": "firing", "alerts": [alert("CrashDrill", "gpu-2", fingerprint="drill")]}
        run_id = first.post(payload)["results"][0]["run_id"]
        wait_until(lambda: state.steps(run_id)[1].status == "running", 30, "the hold step to start")
        first.kill9()

        # What the dead receiver left: the destructive step done, its successor in flight.
        assert state.get_run(run_id).status == "running"
        assert [s.status for s in state.steps(run_id)] == ["done", "running", "pending"]
        assert LabScheduler(tmp_path / "lab").state("gpu-2") == "quarantined"
        quarantined_before = quarantined_file.read_text()

        second.start()
        wait_until(lambda: state.get_run(run_id).status == "done", 60, "the resumed run to finish")
        steps = state.steps(run_id)
        assert [s.status for s in steps] == ["done", "done", "done"]
        assert [s.attempts for s in steps] == [1, 2, 1]  # only the wait ran twice
        assert quarantined_file.read_text() == quarantined_before  # quarantine not re-issued

        # Alertmanager repeats the notification to the restarted receiver: nothing runs again.
        assert second.post(payload)["results"][0]["outcome"] == "duplicate"

        with AuditLog(tmp_path / "audit.db") as audit:
            started = [r.payload["step"] for r in audit.records(kind="runbook.step.started")]
            finished = [r.payload["step"] for r in audit.records(kind="runbook.step")]
            assert started.count("out") == 1 and finished.count("out") == 1
            assert started.count("hold") == 2 and finished == ["out", "hold", "tell"]
            assert audit.verify().ok
        assert len(state.runs()) == 1
    finally:
        first.stop()
        second.stop()
        state.close()
    assert json.loads(quarantined_file.read_text())["reason"] == "crash drill"
