"""One vocabulary and one set of figures for a failover in every output: the lab's text, its
JSON and the audit report say "quarantine decided" for the controller's verdict and
"quarantined" for the scheduler's action done, with the same numbers; resume_s has one
definition (aidc.goodput's) and one value; and no sentence prints `None`."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from aidc.cli.failover_cmd import event_line
from aidc.cli.lab_cmd import summary_text
from aidc.goodput import StepLog, job_report
from aidc.lab.run import LabResult, resume_s_after
from aidc.milestones import DEFINITIONS


def test_the_labs_resume_s_is_the_goodput_accountings_figure_for_the_fault(tmp_path):
    """A job on gpu-0..1 faults at t=6.2 (detected 6.3); the restarted job's first step starts at
    7.4 and ends at 7.9 (the lab used to measure to the end of that step, plus its checkpoint)."""
    path = tmp_path / "goodput.jsonl"
    log = StepLog(path, job="llm")
    log.allocation(t=0.0)
    log.start(0, world=["gpu-0", "gpu-1"], t=1.0)
    for step in range(1, 6):
        log.step_done(step, 1.0 + step, 1.5 + step)
    log.fault(6.2, node="gpu-1", detected_t=6.3, what="XID 79")
    log.start(4, world=["gpu-0", "gpu-spare-0"], t=7.0)
    log.step_done(5, 7.4, 7.9)
    log.step_done(6, 7.9, 8.4)
    assert resume_s_after(path) == 1.2
    assert resume_s_after(path) == job_report(path).to_dict()["resume_s"][-1]


def test_a_failover_event_without_an_xid_is_listed_without_one():
    straggler = {"id": 3, "node": "gpu-2", "kind": "straggler", "xid": None, "action": "drain", "outcome": "done",
                 "pending": False}
    assert event_line(straggler) == "event 3: gpu-2 straggler -> drain [done]"
    assert event_line({**straggler, "kind": "xid", "xid": 79}) == "event 3: gpu-2 xid xid=79 -> drain [done]"


def fields(text: str) -> dict[str, str]:
    """The summary's `  name   value   (definition)` lines as {name: value}."""
    return {line[2:19].strip(): line[20:].split("   (")[0] for line in text.splitlines()[2:]}


ABSENT = st.none()


@settings(max_examples=80, deadline=None)
@given(victim=ABSENT | st.just("gpu-1"), xid=ABSENT | st.just(79), detect=ABSENT | st.floats(1, 999),
       quarantine=ABSENT | st.floats(1, 999), resume=ABSENT | st.floats(0.1, 9), lost=ABSENT | st.integers(0, 3),
       ettr=ABSENT | st.floats(0, 1), error=ABSENT | st.just("training did not finish"),
       scheduler=st.sampled_from(["lab", "slurm"]), drain=ABSENT | st.just("aidc: XID 79"))
def test_the_lab_summary_never_prints_none_and_defines_each_figure(victim, xid, detect, quarantine, resume, lost,
                                                                    ettr, error, scheduler, drain):
    result = LabResult(victim=victim, xid=xid, detect_ms=detect, quarantine_ms=quarantine, resume_s=resume,
                       steps_lost=lost, ettr=ettr, error=error, scheduler=scheduler, drain_reason=drain)
    text = summary_text(result)
    got = fields(text)
    assert not [k for k, v in got.items() if re.search(r"\bNone\b", v)]
    for key, value in (("detect_ms", detect), ("quarantine_ms", quarantine), ("resume_s", resume)):
        assert got[key] == ("not reached" if value is None else str(value))
    definitions = dict(re.findall(r"^  (detect_ms|quarantine_ms|resume_s)\s+.*?\((.*)\)$", text, re.M))
    assert definitions == DEFINITIONS


def test_a_lab_wait_says_what_it_waits_for_every_five_seconds_until_it_is_over():
    from aidc.lab.run import Reminder

    said, now, answers = [], [0.0], iter([None] * 12 + ["ready"])

    def predicate():
        now[0] += 1.0  # one poll a second
        return next(answers)

    wait = Reminder("the first training step", predicate, said.append, clock=lambda: now[0])
    assert [wait() for _ in range(13)][-1] == "ready"
    assert said == ["waiting for the first training step (5 s)", "waiting for the first training step (10 s)"]
