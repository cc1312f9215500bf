"""Reading Slurm's answers: node states with flags, `scontrol show node -o` lines, and the
input checks that keep node names and reasons to one harmless argv element. No daemons."""

from __future__ import annotations

import re

import pytest

from aidc.failover.slurm import (MAX_REASON, SlurmError, check_node_name, drain_reason, parse_node_line,
                                 parse_state)


@pytest.mark.parametrize("text, base, flags", [
    ("IDLE", "IDLE", set()),
    ("IDLE+DRAIN", "IDLE", {"DRAIN"}),
    ("MIXED+DRAIN", "MIXED", {"DRAIN"}),
    ("ALLOCATED+DRAIN", "ALLOCATED", {"DRAIN"}),
    ("DOWN*", "DOWN", {"NOT_RESPONDING"}),
    ("DOWN+DRAIN", "DOWN", {"DRAIN"}),
    ("IDLE+NOT_RESPONDING", "IDLE", {"NOT_RESPONDING"}),
    ("IDLE*+DRAIN", "IDLE", {"NOT_RESPONDING", "DRAIN"}),
    ("DOWN+DRAIN+NOT_RESPONDING", "DOWN", {"DRAIN", "NOT_RESPONDING"}),
    ("IDLE+CLOUD+POWERED_DOWN", "IDLE", {"CLOUD", "POWERED_DOWN"}),
    ("MIXED+COMPLETING+DRAIN", "MIXED", {"COMPLETING", "DRAIN"}),
    # sinfo's long and short names fold the drain flag into the state name
    ("drained", "IDLE", {"DRAIN"}),
    ("draining", "ALLOCATED", {"DRAIN"}),
    ("drng", "ALLOCATED", {"DRAIN"}),
    ("drain*", "IDLE", {"DRAIN", "NOT_RESPONDING"}),
    ("idle*", "IDLE", {"NOT_RESPONDING"}),
    ("down*", "DOWN", {"NOT_RESPONDING"}),
    ("mixed-", "MIXED", {"PLANNED"}),
    ("alloc", "ALLOCATED", set()),
    ("inval", "DOWN", {"INVALID_REG"}),
    ("fail", "DOWN", {"FAIL"}),
    ("idle~", "IDLE", {"POWERED_DOWN"}),
])
def test_node_states_with_flags_parse_to_a_base_and_flags(text, base, flags):
    assert parse_state(text) == (base, frozenset(flags))


def test_an_unknown_state_word_is_kept_as_a_flag_not_dropped():
    assert parse_state("REBOOTING_SOON+DRAIN") == ("UNKNOWN", frozenset({"REBOOTING_SOON", "DRAIN"}))


def test_an_empty_state_is_an_error():
    with pytest.raises(SlurmError):
        parse_state("  ")


LINE = ("NodeName=gpu-1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 Gres=gpu:2 "
        "NodeAddr=127.0.0.1 OS=Linux 6.18.44-fc-v509 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1024 "
        "State={state} ThreadsPerCore=1 Partitions=gpu  CfgTRES=cpu=2,mem=1G,billing=2 AllocTRES= "
        "CapWatts=n/a{reason}")


def test_a_node_line_with_spaces_in_values_and_an_aidc_reason_reads_back_exactly():
    written, _ = drain_reason("XID 79 on gpu 0 State=RESUME x=y", "12", "gpu-1")
    line = LINE.format(state="MIXED+DRAIN", reason=f" Reason={written} [root@2026-11-29T23:32:46]")
    st = parse_node_line(line, aidc_user="root")
    assert (st.name, st.base, st.flags) == ("gpu-1", "MIXED", frozenset({"DRAIN"}))
    assert st.reason == written and st.reason_by == "root"
    assert st.drained_by_aidc and st.aidc_event == "12" and st.why_out == "aidc"


def test_a_reason_followed_by_more_fields_is_cut_at_its_stamp():
    line = LINE.format(state="IDLE+DRAIN", reason=" Reason=PSU swap [alice@2026-01-02T03:04:05] Comment=(null)")
    st = parse_node_line(line)
    assert st.reason == "PSU swap" and st.reason_by == "alice"
    assert st.drained and not st.drained_by_aidc and st.why_out == "operator_drain"


def test_down_and_not_responding_are_out_of_service_but_not_aidcs():
    st = parse_node_line(LINE.format(state="DOWN*", reason=" Reason=Not responding [slurm@2026-01-02T03:04:05]"))
    assert st.down and st.out_of_service and st.why_out == "down" and not st.drained_by_aidc
    idle = parse_node_line(LINE.format(state="IDLE+NOT_RESPONDING", reason=""))
    assert not idle.out_of_service and idle.reason == "" and idle.why_out is None


def test_a_line_without_a_state_is_an_error_not_a_guess():
    with pytest.raises(SlurmError, match="NodeName/State"):
        parse_node_line("Node gpu-9 not found")


@pytest.mark.parametrize("name", ["gpu-1; rm -rf /", "gpu-1\nState=RESUME", "gpu-[0-3]", "gpu-0,gpu-1", "",
                                  "-gpu", "$(reboot)", "gpu 1", "g" * 64, "gpu-1\x00"])
def test_node_names_that_are_not_plain_host_names_are_refused(name):
    with pytest.raises(SlurmError, match="refusing node name"):
        check_node_name(name)


def test_reasons_lose_control_characters_and_are_cut_with_a_note_keeping_the_event():
    text, note = drain_reason("GPU 0\nState=RESUME\r\t$(reboot) `x`; " + "y" * 5000, "42", "gpu-1")
    assert text.startswith("aidc: GPU 0 State=RESUME $(reboot) `x`; yyy")
    assert re.search(r"\.\.\. \(event 42, mark [0-9a-f]{12}\)$", text)
    assert len(text) == MAX_REASON and "\n" not in text
    assert "replaced by spaces" in note and "cut to" in note
    assert re.fullmatch(r"aidc: plain \(mark [0-9a-f]{12}\)", drain_reason("plain", None, "gpu-1")[0])


def test_an_event_id_with_odd_characters_is_refused():
    with pytest.raises(SlurmError, match="refusing event id"):
        drain_reason("x", "1) [root", "gpu-1")
