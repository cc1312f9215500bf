"""Whose drain is it? aidc owns a Slurm drain only when Slurm shows the exact reason aidc wrote
(with the mark that binds it to the node and event) set by the user aidc runs as; anything else
is an operator's (or Slurm's), never resumed and never counted as aidc's. Races are placed
exactly with FakeSlurm (slurmctld's update semantics, in process); the parser is checked against
generated operator reasons."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aidc.audit import AuditLog
from aidc.failover.slurm import ReleaseRefused, SlurmScheduler, drain_reason, parse_node_line

from .fake_slurm import FakeSlurm

NODES = ["gpu-0", "gpu-1", "gpu-2"]
AIDC, OPERATOR = "aidc", "alice"

# Words an operator's reason may hold, the awkward ones included: aidc's prefix, a bracketed
# stamp like Slurm's own, field syntax, aidc's event suffix.
WORDS = st.one_of(
    st.sampled_from(["aidc:", "[bob@2026-01-02T03:04:05]", "[aidc@2026-12-07T06:00:00]", "State=IDLE",
                     "State=RESUME", "Comment=x", "Reason=y", "(event", "7)", "(event 7, mark 0123456789ab)",
                     "[ticket", "4411]", "@", "=", "NodeName=gpu-9"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12))
OPERATOR_REASONS = st.lists(WORDS, min_size=1, max_size=8).map(" ".join)


def scheduler(tmp_path, fake: FakeSlurm) -> SlurmScheduler:
    sched = SlurmScheduler(audit=AuditLog(tmp_path / "audit.db"), actor="test", user=AIDC, nodes=NODES)
    sched._exec = fake.exec   # every Slurm call goes to the fake, with its semantics
    return sched


def view(st_) -> tuple:
    return st_.name, st_.base, st_.flags, st_.reason, st_.reason_by, st_.why_out


@settings(max_examples=300, deadline=None)
@given(reason=OPERATOR_REASONS, comment=st.sampled_from(["(null)", "rack 4", "x [root@2026-01-01T00:00:00]"]))
def test_any_operator_reason_parses_as_an_operator_drain_exactly(reason, comment):
    fake = FakeSlurm(["gpu-1"])
    fake.drain("gpu-1", reason, OPERATOR)
    fake.nodes["gpu-1"].comment = comment
    parsed = parse_node_line(fake.line("gpu-1"), aidc_user=AIDC)
    assert view(parsed)[:3] + view(parsed)[5:] == ("gpu-1", "IDLE", frozenset({"DRAIN"}), "operator_drain")
    if "@" not in comment:
        # A comment holding a stamp too leaves the text ambiguous: then only the state is promised.
        assert (parsed.reason, parsed.reason_by) == (reason, OPERATOR)


@settings(max_examples=200, deadline=None)
@given(text=OPERATOR_REASONS, event=st.from_regex(r"[0-9]{1,6}", fullmatch=True))
def test_aidcs_own_reason_is_aidcs_only_on_its_node_and_as_its_user(text, event):
    written, _ = drain_reason(text, event, "gpu-1")
    fake = FakeSlurm(["gpu-1", "gpu-2"])
    fake.drain("gpu-1", written, AIDC)
    own = parse_node_line(fake.line("gpu-1"), aidc_user=AIDC)
    assert (own.why_out, own.aidc_event, own.reason) == ("aidc", event, written)
    # The same words set by someone else, or copied onto another node, are not aidc's.
    assert parse_node_line(fake.line("gpu-1"), aidc_user="root").why_out == "operator_drain"
    fake.drain("gpu-2", written, AIDC)
    assert parse_node_line(fake.line("gpu-2"), aidc_user=AIDC).why_out == "operator_drain"


@pytest.mark.parametrize("reason", [
    "aidc: held for RMA",                                     # starts with aidc's prefix
    "aidc: XID 79 on gpu 0 (event 7)",                        # aidc's old form, no mark
    "aidc: XID 79 on gpu 0 (event 7, mark 000000000000)",     # a mark that does not verify
    "PSU swap [bob@2026-01-02T03:04:05] State=IDLE",          # a stamp and a state in the text
])
def test_an_operators_drain_that_looks_like_aidcs_is_never_resumed_nor_counted(tmp_path, reason):
    fake = FakeSlurm(NODES)
    fake.drain("gpu-1", reason, AIDC)   # even as aidc's own user: the words do not verify
    sched = scheduler(tmp_path, fake)
    with pytest.raises(ReleaseRefused) as refused:
        sched.release("gpu-1", "fault cleared")
    assert refused.value.decision.decision == "operator_drain"
    assert fake.nodes["gpu-1"].flags == {"DRAIN"} and fake.nodes["gpu-1"].reason == reason
    assert sched.out_of_service() == {} and sched.state("gpu-1") == "quarantined"


def test_aidcs_exact_reason_set_by_another_user_is_not_aidcs(tmp_path):
    fake = FakeSlurm(NODES)
    sched = scheduler(tmp_path, fake)
    sched.quarantine("gpu-1", "XID 79 on gpu 0", event="7")
    written = fake.nodes["gpu-1"].reason
    fake.drain("gpu-1", written, OPERATOR)   # an operator re-drains, pasting aidc's reason
    with pytest.raises(ReleaseRefused):
        sched.release("gpu-1", "fault cleared")
    assert fake.nodes["gpu-1"].flags == {"DRAIN"}


def test_quarantine_then_release_of_its_own_drain(tmp_path):
    fake = FakeSlurm(NODES)
    sched = scheduler(tmp_path, fake)
    assert sched.quarantine("gpu-1", "XID 79 on gpu 0", event="7") is None
    assert fake.nodes["gpu-1"].reason == drain_reason("XID 79 on gpu 0", "7", "gpu-1")[0]
    assert {n: s.aidc_event for n, s in sched.out_of_service().items()} == {"gpu-1": "7"}
    assert sched.release("gpu-1", "GPU replaced").decision == "released"
    assert fake.nodes["gpu-1"].flags == set()


def _is_drain_of(node):
    return lambda argv: argv[:2] == ["scontrol", "update"] and f"NodeName={node}" in argv and "State=DRAIN" in argv


@pytest.mark.parametrize("operator_reason", ["PSU swap, ticket 4411", "aidc: keep out"])
def test_an_operator_drain_landing_right_after_aidcs_is_seen_kept_audited_and_never_resumed(tmp_path,
                                                                                          operator_reason):
    fake = FakeSlurm(NODES)
    sched = scheduler(tmp_path, fake)
    fake.after_call(_is_drain_of("gpu-1"), lambda: fake.drain("gpu-1", operator_reason, OPERATOR))
    note = sched.quarantine("gpu-1", "XID 79 on gpu 0", event="7")
    assert note is not None and "not aidc's" in note
    contested = [r.payload for r in sched.audit.records(kind="slurm.drain_contested")]
    assert [(p["reason"], p["reason_by"]) for p in contested] == [(operator_reason, OPERATOR)]
    assert sched.out_of_service() == {}
    with pytest.raises(ReleaseRefused):
        sched.release("gpu-1", "fault cleared")
    assert (fake.nodes["gpu-1"].flags, fake.nodes["gpu-1"].reason) == ({"DRAIN"}, operator_reason)


def test_an_operator_drain_landing_between_quarantine_and_release_is_never_resumed(tmp_path):
    fake = FakeSlurm(NODES)
    sched = scheduler(tmp_path, fake)
    sched.quarantine("gpu-1", "XID 79 on gpu 0", event="7")
    fake.drain("gpu-1", "aidc: bios update", AIDC)   # even from aidc's own account
    with pytest.raises(ReleaseRefused):
        sched.release("gpu-1", "fault cleared")
    assert fake.nodes["gpu-1"].reason == "aidc: bios update" and fake.nodes["gpu-1"].flags == {"DRAIN"}
    assert not any("State=RESUME" in c for c in fake.calls)
