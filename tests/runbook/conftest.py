"""Fixtures for runbook tests (fakes live in runbook_fakes.py)."""

from __future__ import annotations

import pytest

from aidc.audit.log import AuditLog
from aidc.runbook.actuators import Actuators
from aidc.runbook.catalog import Catalog
from aidc.runbook.engine import Engine
from aidc.runbook.state import RunState
from aidc.spec import Policy
from runbook_fakes import NODES, FakeBurnin, FakeMetrics, FakeNotifier, FakePlaybooks, FakeScheduler, write_runbook


@pytest.fixture
def fakes():
    return Actuators(scheduler=FakeScheduler(), metrics=FakeMetrics(), playbooks=FakePlaybooks(),
                     burnin=FakeBurnin(), notifier=FakeNotifier())


@pytest.fixture
def make_engine(tmp_path, fakes):
    """make_engine(*runbook_yaml_texts, policy=Policy()) -> Engine over fresh state and audit."""
    opened = []

    def make(*texts: str, policy: Policy | None = None, actuators: Actuators | None = None) -> Engine:
        rb_dir = tmp_path / "runbooks"
        rb_dir.mkdir(exist_ok=True)
        for text in texts:
            write_runbook(rb_dir, text)
        engine = Engine(catalog=Catalog.load(rb_dir), state=RunState(tmp_path / "state.db"),
                        audit=AuditLog(tmp_path / "audit.db"), actuators=actuators or fakes, nodes=list(NODES),
                        policy=policy or Policy())
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        engine.stop.set()
        engine.audit.close()
        engine.state.close()


