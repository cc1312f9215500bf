"""Names that are not nodes: refused where they enter, audited, never an intent, never a path.

Specification: a fault event for a name the scheduler does not list (a typo, a node removed,
a hostile `../x`) is refused by the controller with verdict `refused_unknown_node`: no intent
is written, the scheduler is not called, the blast radius is not touched, so the next real
fault is acted on; the refusal is audited once per window with the rest counted. An intent
for such a name that a store holds already (written before this check existed) is dropped at
recovery and never counts as a node out of service. The lab scheduler builds no path from a
name outside its nodes/ directory and signals no process group listed elsewhere. `aidc
failover release` of an unknown name is refused and audited. The lab scheduler is real (its
nodes are directories), with a real process group for the hostile-name case.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from aidc.audit import AuditLog
from aidc.cli.main import app
from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.controller import FailoverController
from aidc.failover.scheduler import LabScheduler
from aidc.lab.cluster import evict_from_rendezvous
from aidc.nodenames import AUDIT_KIND, NodeNameError, RefusalLog, UnknownNode
from aidc.spec import parse_spec
from aidc.store import Store

SPEC = parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM",
                                                "gpus_per_node": 2, "spares": 1}],
                   "policy": {"max_unavailable": 1}})
UNKNOWN = ["gpu-9", "ghost", "../x", "..", "a/b", "/etc", "", "gpu-1\x00", "gpu-\u0430", "x" * 300]


def _fault(node: str) -> FaultEvent:
    return FaultEvent(node, FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", gpu=0, xid=79)


class FrozenClock:
    def __call__(self) -> float:
        return 0.0


@pytest.fixture
def lab(tmp_path):
    """A lab directory with the spec's nodes, its store and audit log."""
    lab = tmp_path / "lab"
    for node in SPEC.nodes():
        (lab / "nodes" / node.name).mkdir(parents=True)
    store = Store(lab / "state.db")
    with AuditLog(lab / "audit.db") as audit:
        yield lab, store, audit
    store.close()


def test_an_event_for_a_name_the_scheduler_does_not_know_is_refused_and_never_becomes_an_intent(lab):
    lab_dir, store, audit = lab
    ctl = FailoverController(SPEC, store, audit, LabScheduler(lab_dir))
    for name in UNKNOWN:
        store.append(_fault(name))
    decisions = ctl.run_once()
    assert [d.verdict for d in decisions] == ["refused_unknown_node"] * len(UNKNOWN)
    assert store.nodes_in_state("quarantining", "quarantined") == []
    assert store.pending() == []
    assert [o for _, _, o in store.events()] == ["refused_unknown_node"] * len(UNKNOWN)
    assert audit.records(kind="failover.action") == []
    refused = [r.payload for r in audit.records(kind=AUDIT_KIND)]
    assert refused and {p["where"] for p in refused} == {"failover"}
    # The blast radius (max_unavailable 1) is whole: the next real fault is acted on.
    store.append(_fault("gpu-1"))
    assert [d.verdict for d in ctl.run_once()] == ["quarantine"]
    assert LabScheduler(lab_dir).state("gpu-1") == "quarantined"


NAMES = st.one_of(
    st.sampled_from([n.name for n in SPEC.nodes()]),
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(list("./\\\x00-_gpu0123\u0430 ")), max_size=12),
    st.lists(st.sampled_from(["..", ".", "gpu-0", "", "nodes", "tmp"]), max_size=5).map("/".join),
)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(NAMES, min_size=1, max_size=4))
def test_every_name_is_either_a_node_of_the_scheduler_or_refused_without_an_intent(names):
    known = {n.name for n in SPEC.nodes()}
    with tempfile.TemporaryDirectory() as tmp:
        lab_dir = Path(tmp) / "lab"
        for node in known:
            (lab_dir / "nodes" / node).mkdir(parents=True)
        store, audit = Store(Path(tmp) / "state.db"), AuditLog(Path(tmp) / "audit.db")
        try:
            for name in names:
                store.append(_fault(name))
            verdicts = {d.node: d.verdict for d in FailoverController(SPEC, store, audit,
                                                                     LabScheduler(lab_dir)).run_once()}
            expected = {n: "refused_unknown_node" for n in names if n not in known}
            assert {n: v for n, v in verdicts.items() if n not in known} == expected
            assert "refused_unknown_node" not in {v for n, v in verdicts.items() if n in known}
            assert set(store.nodes_in_state("quarantining", "quarantined")) <= known
            outside = {p.name for p in Path(tmp).rglob("*") if p.name in ("quarantined", "scheduler.jsonl")
                       and p.parent.parent != lab_dir / "nodes"}
            assert outside == set()
        finally:
            store.close()
            audit.close()


def test_a_flood_of_unknown_names_adds_a_bounded_number_of_audit_records(lab):
    lab_dir, store, audit = lab
    ctl = FailoverController(SPEC, store, audit, LabScheduler(lab_dir))
    ctl.refusals = RefusalLog(audit, "test", clock=FrozenClock())  # one window for the whole flood
    with store.transaction():
        for i in range(400):
            store.append(_fault(f"ghost-{i}"))
    for _ in range(3):
        ctl.run_once()
    ctl.refusals.flush()
    refused = [r.payload for r in audit.records(kind=AUDIT_KIND)]
    assert [p["refused"] for p in refused] == [1, 399]
    assert len(audit.records()) == 2


def _intent_left_for(store: Store, name: str) -> int:
    """What a controller before this check left behind: an intent for a name that is no node."""
    event_id = store.append(_fault(name))
    with store.transaction():
        store.set_node_state(name, "quarantining", "XID 79", "failover")
        store.put(f"intent_event:{name}", str(event_id))
    return event_id


def test_an_intent_a_store_holds_for_an_unknown_name_is_dropped_and_does_not_use_the_blast_radius(lab):
    lab_dir, store, audit = lab
    ghost_event = _intent_left_for(store, "ghost")
    ctl = FailoverController(SPEC, store, audit, LabScheduler(lab_dir))
    store.append(_fault("gpu-2"))
    assert [d.verdict for d in ctl.run_once()] == ["refused_unknown_node", "quarantine"]
    assert store.nodes_in_state("quarantining") == []
    assert ctl.recover() == []
    assert store.outcome(ghost_event) == "refused_unknown_node"
    [dropped] = [r for r in audit.records(kind="failover.intent_dropped")]
    assert dropped.payload["event_id"] == ghost_event


def test_recovery_drops_an_unknown_names_intent_instead_of_retrying_it(lab):
    lab_dir, store, audit = lab
    ghost_event = _intent_left_for(store, "../x")
    ctl = FailoverController(SPEC, store, audit, LabScheduler(lab_dir))
    assert ctl.recover() == []
    assert store.nodes_in_state("quarantining") == []
    assert audit.records(kind="failover.error") == []
    assert store.outcome(ghost_event) == "refused_unknown_node"
    assert not (lab_dir / "nodes" / ".." / "x").exists()


@pytest.mark.parametrize("name", ["..", "../..", "../outside", "/tmp", "gpu-0/..", "", "gpu-0\x00", "gpu-\u0430"])
def test_the_lab_scheduler_builds_no_path_outside_its_nodes_and_signals_no_group_listed_there(tmp_path, name):
    lab_dir = tmp_path / "lab"
    (lab_dir / "nodes" / "gpu-0").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # Process groups listed where a hostile name's path would lead.
        for where in (lab_dir, tmp_path, tmp_path / "outside"):
            (where / "pgids.json").write_text(json.dumps([victim.pid]))
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        sched = LabScheduler(lab_dir)
        for call in (lambda: sched.quarantine(name, "hostile"), lambda: sched.release(name, "hostile"),
                     lambda: sched.state(name), lambda: sched.process_groups(name),
                     lambda: sched.add_process_group(name, victim.pid)):
            with pytest.raises(NodeNameError):
                call()
        assert victim.poll() is None
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
        with pytest.raises(NodeNameError):
            evict_from_rendezvous(lab_dir, name)
    finally:
        victim.kill()
        victim.wait()


def test_the_lab_scheduler_lists_its_nodes_and_still_serves_them(lab):
    lab_dir, _, _ = lab
    sched = LabScheduler(lab_dir)
    (lab_dir / "nodes" / "not-a-dir").parent.mkdir(exist_ok=True)
    (lab_dir / "nodes" / "stray.tmp").write_text("")
    assert sched.known_nodes() == {n.name for n in SPEC.nodes()}
    assert sched.quarantine("gpu-spare-0", "test") is None
    assert sched.state("gpu-spare-0") == "quarantined"


def _stack(tmp_path) -> Path:
    """The stack, installed into the test's lab directory (release takes its roles and policy
    from the installation's record, aidc.installation)."""
    from aidc.installation import record
    from aidc.spec import load_stack

    stack = yaml.safe_load((Path(__file__).resolve().parents[1] / "Pulumi.lab.yaml").read_text())
    stack["config"]["aidc:cluster"]["policy"]["dry_run"] = False
    path = tmp_path / "Pulumi.names.yaml"
    path.write_text(yaml.safe_dump(stack))
    (tmp_path / "lab").mkdir(exist_ok=True)
    record(tmp_path / "lab", load_stack(path), "names")
    return path


@pytest.mark.parametrize("name", ["gpu-99", "../x", "gpu-\u0430"])
def test_releasing_a_name_that_is_not_a_node_is_refused_and_audited(tmp_path, name):
    lab_dir = tmp_path / "lab"
    (lab_dir / "nodes" / "gpu-1").mkdir(parents=True)
    Store(lab_dir / "state.db").close()
    result = CliRunner().invoke(app, ["failover", "release", name, "--reason", "repaired",
                                      "--stack", str(_stack(tmp_path)), "--lab-dir", str(lab_dir)])
    assert result.exit_code != 0 and isinstance(result.exception, UnknownNode)  # `aidc` prints it as one line
    with AuditLog(lab_dir / "audit.db") as audit:
        [refused] = audit.records(kind=AUDIT_KIND)
        assert refused.payload["where"] == "cli" and refused.payload["name"] == ascii(name)
        assert audit.records(kind="failover.release") == []
    assert not (lab_dir / "x").exists() and not (lab_dir / "nodes" / "gpu-1" / "scheduler.jsonl").exists()


def test_releasing_a_known_node_still_works(tmp_path):
    lab_dir = tmp_path / "lab"
    (lab_dir / "nodes" / "gpu-1").mkdir(parents=True)
    LabScheduler(lab_dir).quarantine("gpu-1", "XID 79")
    Store(lab_dir / "state.db").close()
    result = CliRunner().invoke(app, ["failover", "release", "gpu-1", "--reason", "repaired", "--json",
                                      "--stack", str(_stack(tmp_path)), "--lab-dir", str(lab_dir)])
    assert result.exit_code == 0, result.output
    assert LabScheduler(lab_dir).state("gpu-1") == "in_service"


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "gpu-\u0430"])
def test_a_lab_node_launcher_with_a_name_that_is_not_a_node_form_stops_before_writing_anything(tmp_path, name, capsys):
    from aidc.kms.local import LocalKeyring
    from aidc.lab.node_launcher import main

    lab_dir = tmp_path / "lab"
    (lab_dir / "nodes" / "gpu-0").mkdir(parents=True)
    LocalKeyring.create(lab_dir / "keyring", "lab")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["--node", name, "--lab-dir", str(lab_dir), "--rdzv", "127.0.0.1:1", "--nnodes", "1"]) == 2
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert capsys.readouterr().err.startswith("aidc: error: refusing node name")
