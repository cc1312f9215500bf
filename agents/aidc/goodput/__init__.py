"""Goodput: where a training job's time goes (ETTR) and how often it should checkpoint.

`StepLog` is the job-side API (a documented JSONL log, docs/goodput-steplog.md);
`job_report` and `job_advice` are what `aidc goodput report|advise` print.
"""

from __future__ import annotations

import os
from pathlib import Path

from aidc.goodput.accounting import ETTR_DEFINITION, Goodput, account
from aidc.goodput.advice import AdviceError, Mtbf, advise, mtbf_from_audit
from aidc.goodput.steplog import StepLog, StepLogError, read_step_log

__all__ = ["ETTR_DEFINITION", "AdviceError", "Goodput", "StepLog", "StepLogError", "account", "job_advice",
           "job_report", "read_step_log"]


def job_report(path: str | os.PathLike) -> Goodput:
    return account(read_step_log(path))


def job_advice(path: str | os.PathLike, mtbf_s: float | None = None, audit_db: str | os.PathLike | None = None,
               restart_s: float | None = None) -> dict:
    """Checkpoint-interval advice for the job whose step log is `path`.

    Save cost and the current interval come from the log; the restart cost from the log's
    measured resumes (else `restart_s`, else 0 with a note); the MTBF is `mtbf_s` when given,
    else the fleet's observed one from `audit_db`."""
    g = job_report(path)
    if not g.checkpoints:
        raise AdviceError(f"{path}: the step log has no checkpoint records, so there is no save cost to advise from")
    if mtbf_s is not None:
        if not mtbf_s > 0:
            raise AdviceError(f"--mtbf-s must be > 0, not {mtbf_s}")
        mtbf = Mtbf(float(mtbf_s), "given")
    elif audit_db is not None:
        if not Path(audit_db).exists():
            raise AdviceError(f"MTBF unknown: no audit log at {audit_db}; give --mtbf-s SECONDS or --audit-db PATH")
        mtbf = mtbf_from_audit(audit_db, g.world_size)
    else:
        raise AdviceError("MTBF unknown: give the fleet's mean time between failures with --mtbf-s SECONDS, "
                          "or --audit-db PATH to measure it from the quarantines in the audit log")
    notes = []
    if g.resume_s:
        restart = sorted(g.resume_s)[len(g.resume_s) // 2]
        restart_source = f"median of {len(g.resume_s)} measured resume(s)"
    elif restart_s is not None:
        restart, restart_source = float(restart_s), "given"
    else:
        restart, restart_source = 0.0, "none measured"
        notes.append("no fault in the step log: restart cost taken as 0 (give --restart-s to set it)")
    delta = g.checkpoint_stall_s_median or 0.0
    current = None
    if g.checkpoint_interval_s_median is not None:
        current = max(g.checkpoint_interval_s_median - delta, 0.0)
    out = advise(delta, mtbf, restart, current, g.step_s_median)
    out.update({"job": g.job, "restart_source": restart_source, "checkpoint_mode": g.checkpoint_mode,
                "notes": notes, "measured_ettr": round(g.ettr, 4)})
    return out
