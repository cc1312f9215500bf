"""Stragglers while training: the agent judges its node against the fleet from the trainer's
step times (compute by the device clock, wait in the gradient all_reduce), raises one
`straggler` event per episode through the store, exports the step phases and relative perf,
and failover acts on it only as policy.stragglers.action says."""

from __future__ import annotations

import json
import random

import pytest

from aidc.audit.log import AuditLog
from aidc.device.sim import SimBackend, create_node
from aidc.events import Action, FaultKind
from aidc.failover.controller import FailoverController
from aidc.health.agent import HealthAgent
from aidc.health.stragglers import StepTimeFollower, StragglerJudge, parse_step_line
from aidc.spec import StragglerPolicy, parse_spec
from aidc.store import Store

from tests.health.conftest import metric_value

NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
WINDOW = 10


def step_line(step: int, compute: list[float], comm: list[float] | None = None, nodes=NODES) -> dict:
    """One step as the trainer reports it. Without `comm`, the waits synchronous data-parallel
    gives: every rank leaves the collective when the slowest arrives."""
    if comm is None:
        comm = [max(compute) - c + 0.002 for c in compute]
    return {"step": step, "t": 0.0, "node": nodes[0], "rank": 0, "nodes": list(nodes), "compute_s": compute,
            "comm_s": comm}


def noisy_steps(first: int, count: int, slow: dict[int, float] | None = None, seed: int = 0,
                noise: float = 0.02) -> list[dict]:
    """Steps of a 10 ms compute phase with a few percent of noise per rank; `slow` multiplies ranks."""
    rng = random.Random(seed)
    out = []
    for step in range(first, first + count):
        compute = [0.010 * (1 + rng.uniform(-noise, noise)) * (slow or {}).get(r, 1.0) for r in range(len(NODES))]
        out.append(step_line(step, compute))
    return out


def judge(node: str, **kw) -> StragglerJudge:
    policy = StragglerPolicy(**{"window_steps": WINDOW, "confirm_steps": WINDOW, **kw})
    return StragglerJudge(node, policy.window_steps, policy.tolerance, policy.min_robust_z, policy.min_wait_share,
                          policy.confirm_steps, policy.min_slowest_share)


def verdicts(j: StragglerJudge, steps: list[dict]) -> list:
    out = []
    for s in steps:
        j.add(s)
        out.append(j.verdict())
    return out


def test_a_rank_computing_10_percent_longer_is_the_straggler_and_no_other_rank_is():
    steps = noisy_steps(1, 4 * WINDOW, slow={2: 1.10})
    results = {n: verdicts(judge(n), steps)[-1] for n in NODES}
    assert results["gpu-2"].straggler
    assert 0.88 < results["gpu-2"].relative_perf < 0.93
    assert results["gpu-2"].wait_share == 1.0, "the slow rank is the one that waits least"
    assert not any(results[n].straggler for n in NODES if n != "gpu-2")


def test_a_healthy_fleet_with_noise_has_no_straggler():
    steps = noisy_steps(1, 10 * WINDOW, seed=3, noise=0.04)
    for n in NODES:
        assert not any(v and v.straggler for v in verdicts(judge(n), steps))


def test_a_fleet_whose_ranks_spread_evenly_flags_none_of_them():
    """The slowest rank is 10% slower, but another is 10% faster: the others' spread says that is the fleet's."""
    steps = [step_line(s, [0.009, 0.010, 0.010, 0.011]) for s in range(1, 3 * WINDOW)]
    v = verdicts(judge("gpu-3"), steps)[-1]
    assert v.relative_perf < 0.95 and v.robust_z < 3.5 and not v.straggler


def test_other_work_that_inflates_a_ranks_clock_on_half_its_steps_does_not_make_it_a_straggler():
    """On a shared host other work adds time to a rank's clock in bursts (here +40% on every other
    step, which moves its median); a slow part is slow on its fastest steps too."""
    rng = random.Random(9)
    steps = [step_line(s, [0.010 * (1 + rng.uniform(-0.02, 0.02)) * (1.4 if r == 1 and s % 2 else 1.0)
                           for r in range(4)]) for s in range(1, 6 * WINDOW)]
    assert not any(v and v.straggler for v in verdicts(judge("gpu-1"), steps))
    assert verdicts(judge("gpu-1"), noisy_steps(1, 4 * WINDOW, slow={1: 1.10}))[-1].straggler


def test_another_rank_slowed_a_little_by_other_work_does_not_hide_the_straggler():
    """gpu-3 runs 4% slow (other work on its core) beside gpu-1's 12%: judged against the fleet's
    spread with gpu-1 in it, gpu-1 would hide behind its own deviation; against the others, not."""
    steps = noisy_steps(1, 4 * WINDOW, slow={1: 1.12, 3: 1.04}, seed=4)
    results = {n: verdicts(judge(n), steps)[-1] for n in NODES}
    assert results["gpu-1"].straggler and results["gpu-1"].robust_z > 3.5
    assert not any(results[n].straggler for n in NODES if n != "gpu-1")


def test_a_rank_that_arrives_late_outside_its_compute_phase_is_found_by_the_waits():
    """Compute alike, but the others wait 30% of a step for gpu-1 every step: a stall the
    compute timer cannot see (slow input, a host hiccup)."""
    steps = [step_line(s, [0.010] * 4, comm=[0.006, 0.001, 0.006, 0.006]) for s in range(1, 4 * WINDOW)]
    v = verdicts(judge("gpu-1"), steps)[-1]
    assert v.relative_perf == 1.0 and v.wait_share == 1.0 and v.straggler
    assert not verdicts(judge("gpu-0"), steps)[-1].straggler


def test_a_slow_spell_shorter_than_the_confirmation_is_not_a_straggler_a_lasting_one_is():
    spell = noisy_steps(1, 2 * WINDOW) + noisy_steps(100, WINDOW // 2 + 3, slow={1: 1.3}) + noisy_steps(200, 3 * WINDOW)
    assert not any(v and v.straggler for v in verdicts(judge("gpu-1", confirm_steps=WINDOW), spell))
    lasting = noisy_steps(1, 2 * WINDOW) + noisy_steps(100, 3 * WINDOW, slow={1: 1.3})
    assert verdicts(judge("gpu-1", confirm_steps=WINDOW), lasting)[-1].straggler


def test_two_equally_slow_ranks_are_both_stragglers_though_they_take_turns_being_the_slowest():
    nodes = [f"gpu-{i}" for i in range(8)]
    rng = random.Random(5)
    steps = [step_line(s, [0.010 * (1 + rng.uniform(-0.02, 0.02)) * (1.12 if r in (1, 2) else 1.0) for r in range(8)],
                       nodes=nodes) for s in range(1, 5 * WINDOW)]
    v1, v2 = (verdicts(judge(n), steps)[-1] for n in ("gpu-1", "gpu-2"))
    assert v1.straggler and v2.straggler and v1.wait_share + v2.wait_share == 1.0 and v1.wait_share < 1
    assert not any(verdicts(judge(n), steps)[-1].straggler for n in nodes if n not in ("gpu-1", "gpu-2"))


def test_the_first_window_after_a_membership_change_is_warm_up_and_not_judged():
    slow = noisy_steps(1, WINDOW, slow={1: 1.3})
    j = judge("gpu-1")
    assert verdicts(j, slow) == [None] * WINDOW
    after_failover = [dict(s, nodes=["gpu-0", "gpu-1", "gpu-2", "gpu-4"]) for s in noisy_steps(100, 2 * WINDOW - 1)]
    assert verdicts(j, after_failover)[-1] is None, "a new membership starts a new warm-up and window"


def test_an_episode_lasts_until_a_whole_window_is_clean_so_it_is_reported_once():
    j = judge("gpu-1", confirm_steps=1)
    states = [v.straggler if v else None
              for v in verdicts(j, noisy_steps(1, 3 * WINDOW, slow={1: 1.15}) + noisy_steps(100, 3 * WINDOW))]
    judged = [st for st in states if st is not None]  # after the warm-up and a full window
    changes = [i for i in range(1, len(judged)) if judged[i] != judged[i - 1]]
    assert judged[0] is True and judged[-1] is False
    assert len(changes) == 1, "on once, off once: no flapping at the edge"
    assert states.index(False) - 3 * WINDOW >= WINDOW, "over only after a whole clean window"


@pytest.mark.parametrize("line", ["", "not json", "[]", '{"step": "1"}',
                                  '{"step": 1, "nodes": ["a"], "compute_s": [1, 2], "comm_s": [1]}',
                                  '{"step": 1, "nodes": ["a"], "compute_s": [NaN], "comm_s": [0]}',
                                  '{"step": 1, "nodes": ["a"], "compute_s": [-1], "comm_s": [0]}'])
def test_lines_that_are_not_the_trainers_are_skipped(line):
    assert parse_step_line(line) is None


def test_the_follower_reads_complete_lines_only_and_restarts_on_a_new_file(tmp_path):
    path = tmp_path / "steptimes.jsonl"
    follower = StepTimeFollower(path)
    assert follower.read() == []  # no training yet
    path.write_text(json.dumps(step_line(1, [0.01] * 4)) + "\n" + '{"step": 2, "torn')
    assert [r["step"] for r in follower.read()] == [1]
    with open(path, "a") as f:
        f.write('"}\n' + json.dumps(step_line(3, [0.01] * 4)) + "\n")
    assert [r["step"] for r in follower.read()] == [3], "the torn line is skipped once complete"
    path.write_text(json.dumps(step_line(1, [0.01] * 4)) + "\n")  # a new job: shorter file
    assert [r["step"] for r in follower.read()] == [1]


@pytest.fixture
def node_env(tmp_path):
    node_dir = create_node(tmp_path / "gpu-2", "gpu-2", gpus=1)
    store, audit = Store(tmp_path / "state.db"), AuditLog(tmp_path / "audit.db")
    yield tmp_path, node_dir, store, audit
    store.close()
    audit.close()


def _agent(node_dir, store, audit) -> HealthAgent:
    return HealthAgent("gpu-2", SimBackend(node_dir), None, store, audit, step_times=node_dir / "steptimes.jsonl",
                       straggler_policy=StragglerPolicy(window_steps=WINDOW, confirm_steps=WINDOW))


def _write(node_dir, steps) -> None:
    with open(node_dir / "steptimes.jsonl", "a") as f:
        f.writelines(json.dumps(s) + "\n" for s in steps)


def test_the_agent_raises_one_straggler_event_exports_the_phases_and_clears_it(node_env):
    tmp_path, node_dir, store, audit = node_env
    agent = _agent(node_dir, store, audit)
    _write(node_dir, noisy_steps(1, 3 * WINDOW, slow={2: 1.2}))
    agent.step()
    _write(node_dir, noisy_steps(100, WINDOW, slow={2: 1.2}))
    agent.step()
    [(_, event, _)] = store.events()
    assert (event.kind, event.action, event.source, event.node) == \
        (FaultKind.STRAGGLER, Action.CONTACT_SUPPORT, "train", "gpu-2")
    assert "relative perf 0.8" in event.message and "least communication wait in 100%" in event.message
    [record] = audit.records(kind="health.fault", node="gpu-2")
    assert record.payload["kind"] == "straggler"
    text = _scrape(agent)
    assert 0.8 < metric_value(text, "aidc_burnin_relative_perf", Hostname="gpu-2", test="train_step") < 0.86
    assert metric_value(text, "aidc_train_step_seconds", Hostname="gpu-2", phase="compute") == pytest.approx(0.012, 0.05)
    assert metric_value(text, "aidc_train_step_seconds", Hostname="gpu-2", phase="comm") < 0.003
    agent.close()

    restarted = _agent(node_dir, store, audit)  # a restart does not report the episode again
    _write(node_dir, noisy_steps(200, 2 * WINDOW, slow={2: 1.2}))
    restarted.step()
    assert len(store.events()) == 1
    _write(node_dir, noisy_steps(300, 4 * WINDOW))
    restarted.step()
    assert len(store.events()) == 1 and "straggler:node" not in restarted.conditions.active
    [cleared] = audit.records(kind="health.cleared", node="gpu-2")
    assert cleared.payload["kind"] == "straggler" and "back with the fleet" in cleared.reason
    restarted.close()


def _scrape(agent: HealthAgent) -> str:
    from prometheus_client import generate_latest

    return generate_latest(agent.metrics.registry).decode()


def _straggler_event(store: Store, node: str = "gpu-1") -> None:
    from aidc.events import FaultEvent

    with store.transaction():
        store.append(FaultEvent(node, FaultKind.STRAGGLER, Action.CONTACT_SUPPORT, "straggler while training: ...",
                                "train"))


class Scheduler:
    name = "recording"

    def __init__(self):
        self.calls = []

    def quarantine(self, node, reason, event=None):
        self.calls.append(node)


def _spec(**stragglers):
    return parse_spec({"name": "t", "node_pools": [{"name": "gpu", "count": 4, "gpu_model": "SIM", "gpus_per_node": 2}],
                       "policy": {"max_unavailable": 1, "stragglers": stragglers}})


def test_by_default_failover_alerts_on_a_straggler_and_keeps_it_in_service(node_env):
    _, _, store, audit = node_env
    _straggler_event(store)
    sched = Scheduler()
    [decision] = FailoverController(_spec(), store, audit, sched).run_once()
    assert decision.verdict == "no_action" and sched.calls == []
    assert store.node_state("gpu-1") == "in_service"
    [alert] = audit.records(kind="failover.alert", node="gpu-1")
    assert "policy.stragglers.action is alert" in alert.reason


def test_policy_quarantine_takes_a_straggler_out_within_the_blast_radius(node_env):
    _, _, store, audit = node_env
    _straggler_event(store, "gpu-1")
    _straggler_event(store, "gpu-2")
    sched = Scheduler()
    verdicts_ = [d.verdict for d in FailoverController(_spec(action="quarantine"), store, audit, sched).run_once()]
    assert verdicts_ == ["quarantine", "refused_blast_radius"] and sched.calls == ["gpu-1"]


def test_the_straggler_policy_is_validated_data():
    from pydantic import ValidationError

    assert StragglerPolicy().action == "alert"
    with pytest.raises(ValidationError):
        StragglerPolicy(action="reboot")
    with pytest.raises(ValidationError):
        StragglerPolicy(window_steps=2)


# Slow links: the trainer's link probe (aidc.lab.trainer.LinkProbe) adds `links_s` to a probe
# step's line: per rail, each rank's ring link time (rank i: its link to rank i + 1).

def probe_steps(first: int, count: int, link_s: dict[str, list[float]] | None = None, every: int = 2,
                seed: int = 0, noise: float = 0.1, comm: list[float] | None = None) -> list[dict]:
    """Healthy compute; every `every` steps a probe whose link times are `link_s` (default: 5 ms
    on both rails) with `noise` (relative, per link and probe)."""
    rng = random.Random(seed)
    link_s = link_s or {"0": [0.005] * 4, "1": [0.005] * 4}
    out = []
    for step, line in zip(range(first, first + count), noisy_steps(first, count, seed=seed)):
        if comm is not None:
            line["comm_s"] = comm
        if step % every == 0:
            line["links_s"] = {r: [t * (1 + rng.uniform(-noise, noise)) for t in ts] for r, ts in link_s.items()}
        out.append(line)
    return out


def cut(rail: str, rank: int, factor: float = 2.0, n: int = 4) -> dict[str, list[float]]:
    """Link times with one rank's rail `factor` times slower: both of its ring links (to rank - 1
    and to rank + 1) carry its rail, so both take longer."""
    links = {"0": [0.005] * n, "1": [0.005] * n}
    links[rail][rank] *= factor
    links[rail][(rank - 1) % n] *= factor
    return links


def test_a_node_whose_rail_is_cut_to_half_is_the_straggler_named_with_its_rail_and_its_neighbours_are_not():
    steps = probe_steps(1, 2 * WINDOW) + probe_steps(2 * WINDOW + 1, 4 * WINDOW, cut("1", 2))
    found = {node: [v for v in verdicts(judge(node), steps) if v and v.straggler] for node in NODES}
    assert {node for node, hits in found.items() if hits} == {"gpu-2"}
    reason = found["gpu-2"][0].describe()
    assert reason.startswith("rail 1: both ring links slow, gpu-1-gpu-2 ") and "gpu-2-gpu-3" in reason


def test_healthy_links_with_noise_and_a_uniformly_slow_rail_name_no_node():
    uniform = {"0": [0.005] * 4, "1": [0.010] * 4}  # the whole rail slow: the fleet floor's business, no culprit
    for steps in (probe_steps(1, 6 * WINDOW, noise=0.2), probe_steps(1, 6 * WINDOW, uniform)):
        for node in NODES:
            assert not any(v and v.straggler for v in verdicts(judge(node), steps)), node


def test_one_slow_link_between_two_nodes_names_neither_end():
    links = {"0": [0.005, 0.010, 0.005, 0.005], "1": [0.005] * 4}  # gpu-1 - gpu-2 only: not one node's rail
    steps = probe_steps(1, 6 * WINDOW, links)
    for node in NODES:
        assert not any(v and v.straggler for v in verdicts(judge(node), steps)), node


def test_a_slow_rail_is_judged_on_the_median_of_the_link_window_so_one_slow_probe_names_nobody():
    j = judge("gpu-2", link_window=5)
    slow_once = probe_steps(2 * WINDOW + 1, 2, cut("0", 2, factor=4))
    steps = probe_steps(1, 2 * WINDOW) + slow_once + probe_steps(2 * WINDOW + 3, 4 * WINDOW)
    assert not any(v and v.straggler for v in verdicts(j, steps))


def test_a_ring_of_two_has_one_link_and_names_no_end():
    nodes = NODES[:2]
    steps = [dict(s, nodes=nodes, compute_s=s["compute_s"][:2], comm_s=s["comm_s"][:2],
                  **({"links_s": {"0": [0.010, 0.010]}} if "links_s" in s else {}))
             for s in probe_steps(1, 6 * WINDOW)]
    assert not any(v and v.straggler for v in verdicts(judge("gpu-0"), steps))


def test_while_a_slow_link_is_named_the_waits_do_not_make_a_straggler_of_another_rank():
    # The waits say gpu-3 arrives late every step (its position in a ring with a slow link).
    comm = [0.004, 0.004, 0.004, 0.0005]
    steps = probe_steps(1, 2 * WINDOW) + probe_steps(2 * WINDOW + 1, 4 * WINDOW, cut("0", 1), comm=comm)
    assert not any(v and v.straggler for v in verdicts(judge("gpu-3"), steps))
    assert any(v and v.straggler for v in verdicts(judge("gpu-1"), steps))


def test_a_cut_rail_that_is_restored_clears_after_a_clean_window():
    j = judge("gpu-2")
    got = verdicts(j, probe_steps(1, 2 * WINDOW) + probe_steps(2 * WINDOW + 1, 4 * WINDOW, cut("0", 2)))
    assert got[-1].straggler
    got = verdicts(j, probe_steps(6 * WINDOW + 1, 4 * WINDOW))
    assert not got[-1].straggler


@pytest.mark.parametrize("links", [{"0": [0.005] * 3}, {"0": "x"}, {"0": [0.005, -1, 0.005, 0.005]}, ["0"],
                                   {"0": [0.005, float("nan"), 0.005, 0.005]}])
def test_a_step_with_malformed_link_times_keeps_its_step_and_drops_the_link_figures(links):
    rec = parse_step_line(json.dumps(dict(step_line(1, [0.01] * 4), links_s=links)))
    assert rec is not None and "links_s" not in rec and rec["compute_s"] == [0.01] * 4


def test_the_agent_raises_the_straggler_event_for_a_cut_rail_with_the_rail_in_its_reason(node_env):
    tmp_path, node_dir, store, audit = node_env
    agent = _agent(node_dir, store, audit)
    _write(node_dir, probe_steps(1, 2 * WINDOW) + probe_steps(2 * WINDOW + 1, 4 * WINDOW, cut("1", 2)))
    agent.step()
    [(_, event, _)] = store.events()
    assert (event.kind, event.node) == (FaultKind.STRAGGLER, "gpu-2")
    assert "rail 1: both ring links slow" in event.message
    agent.close()
