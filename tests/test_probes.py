"""Liveness and readiness as aidc's daemons report them (aidc.probes).

Specification: /healthz answers 200 while the main loop turned within the stall threshold and
503 once it has not (counted from the start until the first turn); /readyz answers 200 only
once the component said it is ready AND it is live. Both bodies are JSON and carry what the
component reported (a controller's `leader`). Any other path is not a probe.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aidc.probes import Probe


class Clock:
    def __init__(self):
        self.now = 0.0  # exact float arithmetic at the threshold

    def __call__(self):
        return self.now


def test_a_new_probe_is_live_but_not_ready_until_the_component_says_so():
    clock = Clock()
    probe = Probe("controller", stall_after_s=5, clock=clock)
    assert probe.healthz()[0] == 200
    code, body = probe.readyz()
    assert (code, body["ready"], body["loop_turns"]) == (503, False, 0)
    probe.ready()
    probe.turned(leader=False)
    code, body = probe.readyz()
    assert (code, body["ready"], body["leader"]) == (200, True, False)


def test_a_start_that_never_reaches_its_loop_fails_liveness_after_the_threshold():
    clock = Clock()
    probe = Probe("agent", stall_after_s=5, clock=clock)
    clock.now += 5.5
    assert probe.healthz()[0] == 503
    assert probe.readyz()[0] == 503


def test_a_stuck_loop_fails_both_probes_and_a_turn_brings_them_back():
    clock = Clock()
    probe = Probe("receiver", stall_after_s=5, clock=clock)
    probe.ready()
    probe.turned()
    clock.now += 4
    assert (probe.healthz()[0], probe.readyz()[0]) == (200, 200)
    clock.now += 2
    code, body = probe.healthz()
    assert (code, body["live"], body["seconds_since_turn"]) == (503, False, 6.0)
    assert probe.readyz()[0] == 503
    probe.turned()
    assert (probe.healthz()[0], probe.readyz()[0]) == (200, 200)


@given(stall=st.floats(0.1, 100), gap=st.floats(0, 200), ready=st.booleans())
def test_the_probes_agree_with_the_threshold_and_readiness(stall, gap, ready):
    clock = Clock()
    probe = Probe("x", stall_after_s=stall, clock=clock)
    if ready:
        probe.ready()
    probe.turned()
    clock.now += gap
    live = gap <= stall
    assert probe.healthz()[0] == (200 if live else 503)
    assert probe.readyz() == ((200 if live and ready else 503), {**probe.healthz()[1], "ready": live and ready})


def test_answers_are_json_for_the_probe_paths_only():
    probe = Probe("controller", stall_after_s=5, clock=Clock())
    code, raw = probe.answer("/readyz")
    assert code == 503 and json.loads(raw)["component"] == "controller"
    assert probe.answer("/metrics") is None
    assert probe.answer("/healthz/../metrics") is None


def test_a_threshold_that_is_not_positive_is_refused():
    with pytest.raises(ValueError):
        Probe("x", stall_after_s=0)
