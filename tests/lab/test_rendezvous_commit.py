"""The controller commits the next rendezvous round itself: survivors and a warm spare, ranked
as torch ranks them, so that no agent has to leave and rejoin (failover.rendezvous.next_round,
commit_next_round; the lab launcher's agents stay in a round committed for them)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("torch")

from torch.distributed import TCPStore  # noqa: E402
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr  # noqa: E402
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend  # noqa: E402

from aidc.failover.rendezvous import EXPIRED, commit_next_round, load_state, next_round  # noqa: E402
from aidc.lab.cluster import evict_from_rendezvous  # noqa: E402
from aidc.polling import free_port  # noqa: E402

A, B, C, DOOMED, SPARE = (dr._NodeDesc("127.0.0.1", pid, 0) for pid in (101, 102, 103, 104, 105))
SETTINGS = dr.RendezvousSettings("run1", 4, 4, dr.RendezvousTimeout(), timedelta(seconds=3), 3)


def complete_round(round_: int = 3) -> dr._RendezvousState:
    """Round `round_` complete with A, B, C and DOOMED; SPARE waits on the redundancy list."""
    state = dr._RendezvousState()
    state.round, state.complete = round_, True
    state.participants = {A: 0, B: 1, C: 2, DOOMED: 3}
    state.redundancy_list = {SPARE}
    then = datetime.now(timezone.utc) - timedelta(seconds=2)
    state.last_heartbeats = {n: then for n in (A, B, C, DOOMED, SPARE)}
    return state


def doomed(node) -> bool:
    return node.pid == DOOMED.pid


def test_the_next_round_has_the_survivors_and_the_spare_ranked_as_torch_ranks_them():
    state = next_round(complete_round(), doomed, world_size=4)
    assert (state.round, state.complete, state.deadline) == (4, True, None)
    assert state.participants == {node: rank for rank, node in enumerate(sorted([A, B, C, SPARE]))}
    assert state.redundancy_list == set() and state.wait_list == set()
    assert DOOMED not in state.last_heartbeats
    assert set(state.last_heartbeats) == {A, B, C, SPARE}


def test_a_survivor_that_already_left_the_round_and_a_spare_that_moved_to_the_wait_list_are_both_in():
    state = complete_round()
    del state.participants[A], state.last_heartbeats[A]  # A's own exit step ran first
    state.wait_list = {A, SPARE}  # A waits for the next round; the spare saw room and moved
    state.redundancy_list = set()
    new = next_round(state, doomed, world_size=4)
    assert set(new.participants) == {A, B, C, SPARE} and new.wait_list == set()


@pytest.mark.parametrize("why, change", [
    ("no spare to take the slot", lambda s: setattr(s, "redundancy_list", set())),
    ("a round already forming", lambda s: setattr(s, "complete", False)),
    ("the rendezvous is closed", lambda s: setattr(s, "closed", True)),
    ("the node is not a member (an idle spare)", lambda s: s.participants.pop(DOOMED)),
])
def test_where_the_next_round_cannot_be_formed_nothing_is_committed(why, change):
    state = complete_round()
    change(state)
    assert next_round(state, doomed, world_size=4) is None, why


def test_commit_writes_the_round_into_the_store_and_torchs_own_join_finishes_in_it():
    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)
    holder = dr._BackendRendezvousStateHolder(C10dRendezvousBackend(server, "run1"), SETTINGS, cache_duration=0)
    holder.sync()
    holder._state = complete_round()
    holder.mark_dirty()
    holder.sync()

    committed = commit_next_round("127.0.0.1", port, "run1", 4, pids={DOOMED.pid})
    assert committed["round"] == 4 and sorted(committed["participants"].values()) == [0, 1, 2, 3]
    holder.sync()
    state = holder.state
    assert (state.round, state.complete) == (4, True) and set(state.participants) == {A, B, C, SPARE}
    deadline = time.monotonic() + 60
    for node in (A, SPARE):  # a survivor and the spare: each is in, nothing to write
        assert dr._RendezvousJoinOp()(dr._RendezvousContext(node, state, SETTINGS), deadline) == dr._Action.FINISH
    assert commit_next_round("127.0.0.1", port, "run1", 4, pids={DOOMED.pid}) is None, "already out: no change"


@pytest.fixture
def launcher_patches():
    """The lab launcher's change to torch's rendezvous, undone after the test."""
    from aidc.lab.node_launcher import _stay_in_committed_rounds

    handler = dr.DynamicRendezvousHandler
    saved = handler.next_rendezvous, handler.num_nodes_waiting, dr._RendezvousExitOp.__call__
    _stay_in_committed_rounds()
    yield saved[2]  # torch's own exit step
    handler.next_rendezvous, handler.num_nodes_waiting, dr._RendezvousExitOp.__call__ = saved


def test_torchs_exit_step_would_leave_a_committed_round_and_the_lab_launcher_stays_in_it(launcher_patches):
    state = next_round(complete_round(), doomed, world_size=4)
    ctx = dr._RendezvousContext(A, state, SETTINGS)
    deadline = time.monotonic() + 60
    # The launcher's agent last joined round 3 (or none, here): round 4 was committed for it.
    assert dr._RendezvousExitOp()(ctx, deadline) == dr._Action.FINISH
    # Unpatched, torch takes the survivor out of the round it was just put in.
    assert launcher_patches(dr._RendezvousExitOp(), ctx, deadline) == dr._Action.REMOVE_FROM_PARTICIPANTS


def test_an_agent_leaves_a_round_it_joined_itself_as_torch_does(launcher_patches, monkeypatch):
    from aidc.lab import node_launcher

    monkeypatch.setitem(node_launcher.JOINED, "round", 3)  # joined round 3 through torch's own join
    ctx = dr._RendezvousContext(A, complete_round(3), SETTINGS)
    assert dr._RendezvousExitOp()(ctx, time.monotonic() + 60) == dr._Action.REMOVE_FROM_PARTICIPANTS


def test_an_agent_with_healthy_workers_restarts_them_once_a_round_is_committed_for_it(launcher_patches, monkeypatch):
    """The agent's monitor asks num_nodes_waiting(); a committed round answers "restart now"."""
    from aidc.lab import node_launcher

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)
    handler = dr.DynamicRendezvousHandler.from_backend("run1", server, C10dRendezvousBackend(server, "run1"), 4, 4,
                                                       local_addr="127.0.0.1")
    me = handler._this_node
    state = complete_round()
    state.participants = {me if n == A else n: r for n, r in state.participants.items()}
    state.last_heartbeats[me] = state.last_heartbeats.pop(A)
    handler._state_holder._state = state
    handler._state_holder.mark_dirty()
    handler._state_holder.sync()
    monkeypatch.setitem(node_launcher.JOINED, "round", 3)
    assert handler.num_nodes_waiting() == 0, "round 3 is the one it is in: nothing to do"
    assert commit_next_round("127.0.0.1", port, "run1", 4, pids={DOOMED.pid})["round"] == 4
    handler._state_holder._last_sync_time = -1  # past the state holder's cache: read the store
    assert handler.num_nodes_waiting() == 1, "round 4 was committed with it in it"


def lab_with_rendezvous(tmp_path, state):
    """A lab directory as the controller sees it: lab.json, the victim's launcher pid, and a
    rendezvous store holding `state`. Returns the store (kept alive by the caller) and a state holder."""
    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)
    holder = dr._BackendRendezvousStateHolder(C10dRendezvousBackend(server, "aidc-lab"), SETTINGS, cache_duration=0)
    holder.sync()
    holder._state = state
    holder.mark_dirty()
    holder.sync()
    (tmp_path / "lab.json").write_text(json.dumps({"ports": {"rdzv": port}, "run_id": "aidc-lab"}))
    (tmp_path / "nodes" / "gpu-3").mkdir(parents=True)
    (tmp_path / "nodes" / "gpu-3" / "launcher.pid").write_text(str(DOOMED.pid))
    return server, holder


def test_the_lab_scheduler_commits_the_next_round_after_a_quarantine(tmp_path):
    _server, holder = lab_with_rendezvous(tmp_path, complete_round())
    evict_from_rendezvous(tmp_path, "gpu-3", world_size=4)
    record = json.loads((tmp_path / "nodes" / "gpu-3" / "rendezvous-evicted.json").read_text())
    assert record["committed"]["round"] == 4 and record["expired"] == []
    holder.sync()
    assert set(holder.state.participants) == {A, B, C, SPARE}


def test_without_a_spare_the_lab_scheduler_falls_back_to_expiring_the_heartbeat(tmp_path):
    state = complete_round()
    state.redundancy_list = set()
    server, holder = lab_with_rendezvous(tmp_path, state)
    evict_from_rendezvous(tmp_path, "gpu-3", world_size=4)
    record = json.loads((tmp_path / "nodes" / "gpu-3" / "rendezvous-evicted.json").read_text())
    assert record["committed"] is None and record["expired"] == [repr(DOOMED)]
    stored = load_state(C10dRendezvousBackend(server, "aidc-lab").get_state()[0])  # as written, before any sync
    assert stored.last_heartbeats[DOOMED] == EXPIRED, "torch's next sync drops it"
    assert stored.round == 3, "no round was committed"
