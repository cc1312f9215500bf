"""Runbook automation: alerts from Alertmanager (or a human) drive guarded, audited,
durable runbooks. Public API: Catalog (runbooks as data), Engine (intake + execution),
RunState (durable state), Receiver (webhook server), Actuators (what steps act through)."""

from aidc.runbook.actuators import ActionResult, Actuators
from aidc.runbook.catalog import Catalog, Runbook, RunbookError, load_runbook, parse_runbook
from aidc.runbook.engine import Engine, Submission
from aidc.runbook.state import RunState

__all__ = ["ActionResult", "Actuators", "Catalog", "Engine", "RunState", "Runbook", "RunbookError",
           "Submission", "load_runbook", "parse_runbook"]
