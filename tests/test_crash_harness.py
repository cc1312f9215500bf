"""The crash harness (issue #13): kill -9s of the failover controller, the runbook receiver
and an agent under faults and alerts lose no event, repeat no destructive action and lose
no audit record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "bench" / "crash_harness.py"


@pytest.mark.slow
def test_a_few_kill_9s_lose_nothing_and_repeat_nothing(tmp_path):
    out = subprocess.run([sys.executable, str(HARNESS), "--kills", "3", "--seed", "7", "--json",
                          "--workdir", str(tmp_path / "crash")], capture_output=True, text=True, timeout=600)
    figures = json.loads(out.stdout)
    assert figures["kills"] == 3 and figures["settled"], out.stderr[-2000:]
    assert figures["faults_injected"] > 0 and figures["alerts_sent"] > 0 and figures["scheduler_calls"] > 0
    assert (figures["lost_events"], figures["repeated_destructive_actions"], figures["lost_audit_records"]) == (0, 0, 0), \
        figures["details"]
    assert figures["audit_verified"] is True
    assert out.returncode == 0
