"""Fakes for runbook tests: actuators that record what they were asked to do, and test runbooks."""

from __future__ import annotations

import textwrap
from pathlib import Path

from aidc.runbook.actuators import ActionResult

ROOT = Path(__file__).resolve().parents[2]
NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]


class FakeScheduler:
    name = "fake"

    def __init__(self):
        self.states: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def quarantine(self, node, reason, event=None):
        self.calls.append(("quarantine", node))
        self.states[node] = "quarantined"

    def release(self, node, reason):
        self.calls.append(("release", node))
        self.states[node] = "in_service"

    def state(self, node):
        return self.states.get(node, "in_service")


class FakeMetrics:
    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.queries: list[str] = []

    def prometheus(self, query, timeout_s):
        self.queries.append(query)
        return self.values.get(query, [])

    def agent(self, node, metric, labels, timeout_s):
        return self.values.get(f"{node}/{metric}", [])


class FakePlaybooks:
    def __init__(self, ok=True):
        self.ok, self.calls = ok, []

    def run(self, playbook, node, extravars, timeout_s):
        self.calls.append((playbook, node, extravars))
        return ActionResult(self.ok, f"fake {playbook}")


class FakeBurnin:
    def __init__(self, ok=True):
        self.ok, self.calls = ok, []

    def run(self, node, tests, timeout_s):
        self.calls.append((node, tests))
        return ActionResult(self.ok, "fake burn-in")


class FakeNotifier:
    def __init__(self):
        self.messages: list[tuple[str, str]] = []

    def notify(self, severity, message, context):
        self.messages.append((severity, message))


def write_runbook(directory: Path, text: str) -> None:
    import yaml

    doc = yaml.safe_load(textwrap.dedent(text))
    (directory / f"{doc['name']}.yaml").write_text(textwrap.dedent(text))


QUARANTINE_AND_NOTIFY = """
name: take-out
title: Take a node out
summary: Quarantine the node and tell on-call.
trigger:
  alerts: [{alertname: NodeBroken}]
  faults: [fallen_off_bus]
params:
  gpu: {type: int, min: 0, max: 15, required: false, description: The GPU the alert names.}
guards: [{guard: node_known}, {guard: blast_radius}]
steps:
  - {id: confirm, kind: check, source: prometheus, query: 'broken{Hostname="${node}"}', expect: "== 1"}
  - {id: out, kind: quarantine, reason: "broken GPU ${gpu}"}
  - {id: tell, kind: notify, message: "${node} is out"}
on_failure:
  - {id: hand-over, kind: notify, severity: critical, message: "take-out failed on ${node}"}
"""

WITH_PLAYBOOK = """
name: fix-it
title: Fix a node
summary: Quarantine, reset after approval, release.
trigger:
  alerts: [{alertname: NeedsFix}]
steps:
  - {id: out, kind: quarantine, reason: "needs a fix"}
  - {id: ok-to-reset, kind: approve, prompt: "Reset ${node}?", timeout_s: 3600}
  - {id: reset, kind: playbook, playbook: gpu-reset.yml}
  - {id: back, kind: release, reason: "fixed"}
on_failure:
  - {id: hand-over, kind: notify, message: "fix-it failed on ${node}"}
"""

UNGUARDED_PLAYBOOK = """
name: reckless
title: Reckless fix
summary: A playbook with no approval before it.
trigger:
  alerts: [{alertname: Reckless}]
steps:
  - {id: reset, kind: playbook, playbook: gpu-reset.yml}
on_failure:
  - {id: hand-over, kind: notify, message: "reckless refused on ${node}"}
"""


def alert(name: str, node: str, fingerprint: str = "fp1", starts_at: str = "2026-01-01T00:00:00Z", **labels) -> dict:
    return {"status": "firing", "labels": {"alertname": name, "Hostname": node, **labels},
            "annotations": {}, "startsAt": starts_at, "fingerprint": fingerprint}

# A person approves, then the node is quarantined (with runbook_auto_approve empty, the
# approval is what lets the quarantine run).
APPROVE_THEN_QUARANTINE = """
name: ask-then-drain
title: Ask, then drain
summary: A person approves, then the node is quarantined.
trigger: {alerts: [{alertname: AskThenDrain}]}
steps:
  - {id: ok-to-drain, kind: approve, prompt: "Drain ${node}?", timeout_s: 3600}
  - {id: out, kind: quarantine, reason: "drained after approval"}
"""
