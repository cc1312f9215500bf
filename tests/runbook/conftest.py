"""Fixtures for runbook tests (fakes live in runbook_fakes.py)."""

from __future__ import annotations

import threading

import pytest

from aidc.audit.log import AuditLog
from aidc.runbook.actuators import Actuators
from aidc.runbook.catalog import Catalog
from aidc.runbook.engine import Engine
from aidc.runbook.receiver import Receiver
from aidc.runbook.state import RunState
from aidc.spec import Policy
from runbook_fakes import NODES, FakeBurnin, FakeMetrics, FakeNotifier, FakePlaybooks, FakeScheduler, write_runbook


@pytest.fixture
def fakes():
    return Actuators(scheduler=FakeScheduler(), metrics=FakeMetrics(), playbooks=FakePlaybooks(),
                     burnin=FakeBurnin(), notifier=FakeNotifier())


@pytest.fixture
def run_state_backend():
    """The state backend make_engine keeps runs and the audit log on: SQLite unless a test
    parametrises this name (`@pytest.mark.parametrize("run_state_backend", ["sqlite", "postgres"])`)."""
    return "sqlite"


@pytest.fixture
def make_engine(tmp_path, fakes, run_state_backend, request):
    """make_engine(*runbook_yaml_texts, policy=Policy()) -> Engine over fresh state and audit;
    make_engine.reopen() -> (RunState, AuditLog) on the same storage, as a restarted process opens it."""
    opened = []
    if run_state_backend == "sqlite":
        locations = {"state": tmp_path / "state.db", "audit": tmp_path / "audit.db"}
    else:
        dsn = request.getfixturevalue("postgres_database")
        locations = {"state": dsn, "audit": dsn}

    def reopen():
        from aidc.state import open_audit_log, open_run_state

        state = open_run_state(run_state_backend, locations["state"])
        audit = open_audit_log(run_state_backend, locations["audit"])
        opened.append(type("Opened", (), {"stop": threading.Event(), "state": state, "audit": audit})())
        return state, audit

    def make(*texts: str, policy: Policy | None = None, actuators: Actuators | None = None) -> Engine:
        rb_dir = tmp_path / "runbooks"
        rb_dir.mkdir(exist_ok=True)
        for text in texts:
            write_runbook(rb_dir, text)
        if run_state_backend == "sqlite":
            state, audit = RunState(locations["state"]), AuditLog(locations["audit"])
        else:
            state, audit = reopen()
        engine = Engine(catalog=Catalog.load(rb_dir), state=state, audit=audit, actuators=actuators or fakes,
                        nodes=list(NODES), policy=policy or Policy())
        opened.append(engine)
        return engine

    make.reopen = reopen
    yield make
    for engine in opened:
        engine.stop.set()
        engine.audit.close()
        engine.state.close()




@pytest.fixture
def serve_receiver():
    """serve_receiver(engine, token, **receiver_options) -> a Receiver serving on a thread, with
    its log lines in `.lines`; every one started is shut down after the test."""
    started = []

    def serve(engine: Engine, token: str | None, **options) -> Receiver:
        lines: list[str] = []
        rec = Receiver(engine, token, "127.0.0.1", 0, scan_interval_s=0.1, log=lines.append, **options)
        thread = threading.Thread(target=rec.serve_forever, daemon=True)
        thread.start()
        rec.lines = lines
        started.append((rec, thread))
        return rec

    yield serve
    for rec, thread in started:
        rec.shutdown()
        thread.join(timeout=10)
