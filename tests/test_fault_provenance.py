"""A node speaks only for itself: a fault whose source is not the node it names is refused,
audited, never acted on and never counted (breaker, escalation), whatever brought it in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aidc.errors import SpecError
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.provenance import key_node, speaks_for
from aidc.spec import parse_spec
from tests.test_failover import RecordingScheduler
from tests.test_failover_escalation import env  # noqa: F401  (the fixture: a store and an audit log)

STORE_ID = "0123456789abcdef0123456789abcdef"


def _spec(**extra):
    return parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM",
                                                     "gpus_per_node": 2}],
                       "policy": {"max_unavailable": 2, "breaker": {"max_quarantines": 1}}, **extra})


def _fault(node: str, observed_at: float = 1000.0) -> FaultEvent:
    return FaultEvent(node, FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", gpu=0, xid=79,
                      observed_at=observed_at)


@pytest.mark.parametrize("source, named", [("gpu-0", ["gpu-1"]), ("gpu-0", ["gpu-1", "gpu-2"]),
                                           ("gpu-3", ["gpu-0", "gpu-1", "gpu-2"])])
def test_events_whose_key_names_another_node_are_refused_audited_and_never_acted_on(env, source, named):
    store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(_spec(), store, audit, sched)
    with store.transaction():
        for i, node in enumerate(named):  # e.g. an older controller's store, or a hand-made row
            store.ingest(f"{source}:{STORE_ID}:{i}", _fault(node))
    decisions = ctl.run_once()
    assert [(d.node, d.verdict) for d in decisions] == [(n, "refused_source") for n in named]
    assert sched.calls == [] and store.pending() == []
    assert {store.node_state(n) for n in named} == {"in_service"}
    refused = [r for r in audit.records() if r.kind == "failover.decision"]
    assert [(r.node, r.payload["verdict"], r.payload["source"]) for r in refused] == \
        [(n, "refused_source", source) for n in named]
    assert not ctl.gate.breaker().get("open") and ctl.gate.recent_quarantines() == []


def test_refused_events_do_not_count_as_repeats_of_the_nodes_own_fault(env):
    store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(_spec(policy={"max_unavailable": 2, "escalation": {"repeats": 2}}), store, audit,
                             sched)
    with store.transaction():
        for i in range(3):  # another node's reports of gpu-1's GPU 0, one per burst
            store.ingest(f"gpu-0:{STORE_ID}:{i}", _fault("gpu-1", observed_at=1000.0 + 100 * i))
    ctl.run_once()
    with store.transaction():
        store.append(_fault("gpu-1", observed_at=1400.0))
    [decision] = ctl.run_once()
    assert decision.verdict == "quarantine"
    assert [r for r in audit.records() if r.kind == "failover.escalation"] == []


def test_a_nodes_own_events_pass_whatever_store_they_come_from(env):
    store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(_spec(), store, audit, sched)
    with store.transaction():
        store.ingest(f"gpu-2:{STORE_ID}:5", _fault("gpu-2"))
    assert [d.verdict for d in ctl.run_once()] == ["quarantine"]
    assert sched.calls == [("quarantine", "gpu-2")]


NODE = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)


@given(NODE, st.integers(0, 2**40))
def test_a_key_names_the_node_before_its_first_colon(node, event_id):
    assert key_node(f"{node}:{STORE_ID}:{event_id}") == node


@given(st.sets(NODE, max_size=3), st.dictionaries(NODE, st.sets(NODE, max_size=4), max_size=3))
def test_a_client_speaks_for_its_own_names_and_the_nodes_listed_for_the_relays_it_is(names, relays):
    expected = set(names).union(*(relays[n] for n in names if n in relays))
    assert speaks_for(names, relays) == expected
    others = {n for n in relays if n not in names}
    assert speaks_for(names, {n: relays[n] for n in others}) == set(names)


def test_the_spec_lists_the_nodes_each_relay_may_report_for():
    spec = _spec(transport={"relays": {"relay-rack-1": ["gpu-0", "gpu-1"]}})
    assert spec.transport.relays == {"relay-rack-1": ["gpu-0", "gpu-1"]}
    assert _spec().transport.relays == {}


@pytest.mark.parametrize("relays, where", [
    ({"relay": ["gpu-9"]}, "transport"),        # not a node of the cluster
    ({"relay": []}, "transport.relays"),        # a relay for nothing is a mistake
    ({"bad name!": ["gpu-0"]}, "transport.relays"),
])
def test_a_relay_listing_that_does_not_fit_the_cluster_is_a_spec_error(relays, where):
    with pytest.raises(SpecError) as err:
        _spec(transport={"relays": relays})
    assert where in str(err.value)


@pytest.mark.parametrize("version, fits", [("1.29", False), ("1.29.9", False), ("1.30", True), ("1.33.4", True)])
def test_the_kubernetes_version_must_carry_the_agents_node_binding(version, fits):
    # ValidatingAdmissionPolicy v1 and the node name in service account tokens arrived in 1.30.
    cluster = {"software": {"kubernetes_version": version}}
    if fits:
        assert _spec(**cluster).software.kubernetes_version == version
    else:
        with pytest.raises(SpecError) as err:
            _spec(**cluster)
        assert err.value.key.endswith("software.kubernetes_version")


def test_on_a_shared_store_the_key_names_the_writing_agent_so_a_lab_agent_cannot_speak_for_another(env):
    store, audit = env
    sched = RecordingScheduler()
    ctl = FailoverController(_spec(), store, audit, sched)
    with store.transaction():
        store.append(_fault("gpu-1"), source="gpu-0")  # the agent of gpu-0, writing gpu-1's fault
        store.append(_fault("gpu-2"), source="gpu-2")
    assert [(d.node, d.verdict) for d in ctl.run_once()] == [("gpu-1", "refused_source"), ("gpu-2", "quarantine")]
    assert sched.calls == [("quarantine", "gpu-2")]
