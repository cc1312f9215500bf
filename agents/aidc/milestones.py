"""A failover's steps and the lab's figures for them, named and defined once: `aidc lab run`'s
text and JSON, the audit report's timeline and verdict, and docs/architecture.md use these.

"decided" is the controller's verdict (its `failover.decision` record); "quarantined" is the
scheduler's action done (its `failover.action` record): a node is quarantined some
milliseconds after the quarantine was decided, and the two are never called by one name."""

from __future__ import annotations

MILESTONES = (("fault", "fault injected / raised"), ("detect", "agent detected it"),
              ("decide", "quarantine decided by the controller"), ("quarantine", "quarantined by the scheduler"),
              ("resume", "training resumed"))

# The lab's figures (LabResult, `aidc lab run --json`, the audit log's lab.summary).
DEFINITIONS = {
    "detect_ms": "fault -> quarantine decided (the controller's verdict, failover.decision)",
    "quarantine_ms": "fault -> quarantined (the scheduler's action done, failover.action)",
    "resume_s": "fault -> start of the first training step on the new membership (aidc.goodput's resume_s)",
}


def ms_after(t0: float, ts: float | None) -> float | None:
    """Milliseconds from t0 to ts, as every output rounds them (0.1 ms)."""
    return None if ts is None else round((ts - t0) * 1000, 1)
