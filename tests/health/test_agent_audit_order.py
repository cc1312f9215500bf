"""A kill -9 of the agent between storing a fault event and auditing it loses no audit
record (issue #13, class 7, found by bench/crash_harness.py)."""

from __future__ import annotations

import pytest

from aidc.audit.log import AuditLog
from aidc.device.sim import SimBackend
from aidc.health.agent import HealthAgent
from aidc.store import Store

LINE = "[ 2001.000001] NVRM: Xid (PCI:0000:17:00): 13, pid=2317, name=python, Ch 00000008, Graphics Exception"


class Killed(SystemExit):
    """The agent process dies here."""


def test_an_agent_killed_while_auditing_a_fault_leaves_no_stored_event_without_its_record(sim_node, tmp_path,
                                                                                         monkeypatch):
    with open(sim_node / "kern.log", "a") as log:
        log.write(LINE + "\n")
    store, audit = Store(tmp_path / "store.db"), AuditLog(tmp_path / "audit.db")
    append = audit.append

    def killed_while_auditing(kind, reason, **kw):
        if kind == "health.fault":
            raise Killed("agent killed while auditing its fault event")
        return append(kind, reason, **kw)

    first = HealthAgent("node-a", SimBackend(sim_node), sim_node / "kern.log", store, audit)
    monkeypatch.setattr(audit, "append", killed_while_auditing)
    with pytest.raises(Killed):
        first.step()
    monkeypatch.setattr(audit, "append", append)
    first.metrics.shutdown()

    restarted = HealthAgent("node-a", SimBackend(sim_node), sim_node / "kern.log", store, audit)
    restarted.step()
    restarted.close()
    events = store.events()
    assert [(e.xid, e.line) for _, e, _ in events] == [(13, LINE)]  # read again after the restart, once
    for event_id, event, _ in events:
        [record] = audit.find("health.fault", event_id=event_id)
        assert record.node == "node-a" and record.payload["line"] == LINE
    assert audit.verify().ok
    store.close()
    audit.close()
