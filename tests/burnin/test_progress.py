"""What a burn-in says while it runs: every phase with its own count against a total known
before the run, so the bar ends at its total (pair tests, whose number only the run decides,
are counted apart), and a line per phase and every few seconds for the lab's text output,
including the start, while the node processes import torch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aidc.burnin.progress import PHASES, BurninProgress
from aidc.burnin.collectives import COLLECTIVES, sweep_sizes


def run_events(nodes: int, repeats: int, sizes: list[int], train_steps: int, pairs: int) -> list[dict]:
    """The events aidc.burnin.worker and the zygote emit in one run, in order: every node's
    `ready` and `sampled` per round, rank 0's `collective` per op and size, `pair` per pair test
    (the localisation, run only when the fleet is slow), `train` per step of each mode, `done`."""
    names = [f"gpu-{i}" for i in range(nodes)]
    events = [{"event": "forked", "nodes": nodes}]
    events += [{"event": "ready", "node": n} for n in names]
    events += [{"event": "sampled", "node": n, "round": r} for r in range(repeats) for n in names]
    events += [{"event": "collective", "node": names[0], "op": op, "nbytes": b} for op in COLLECTIVES for b in sizes]
    events += [{"event": "pair", "node": names[0], "rail": i % 2, "a": 0, "b": 1} for i in range(pairs)]
    events += [{"event": "train", "node": names[0], "mode": m, "step": s + 1, "loss": 1.0}
               for m in ("ddp", "fsdp", "pipeline") for s in range(train_steps)]
    events += [{"event": "done", "node": n} for n in names]
    return events


def progress_for(nodes, repeats, sizes, train_steps, **kw) -> BurninProgress:
    return BurninProgress(nodes=nodes, repeats=repeats, sizes=sizes, collectives=COLLECTIVES,
                          train_steps=train_steps, modes=3, **kw)


def test_the_lab_stacks_run_with_ten_pair_tests_ends_at_its_total_not_past_it():
    """The lab stack (5 nodes, 3 rounds, 4 KiB-4 MiB, 20 steps): 135 counted steps; its
    localisation ran 10 pair tests, which the bar used to count on top (145/135)."""
    sizes = sweep_sizes(4096, 4194304)
    p = progress_for(5, 3, sizes, 20)
    seen = []
    for ev in run_events(5, 3, sizes, 20, pairs=10):
        p.observe(ev)
        seen.append(p.completed)
    assert p.total == 135 and p.completed == 135 and max(seen) == 135
    assert p.counts["localise"] == 10


@settings(max_examples=60, deadline=None)
@given(nodes=st.integers(1, 9), repeats=st.integers(1, 6), n_sizes=st.integers(1, 12),
       train_steps=st.integers(2, 40), pairs=st.integers(0, 30))
def test_every_phase_ends_exactly_at_its_total_and_never_passes_it(nodes, repeats, n_sizes, train_steps, pairs):
    sizes = [2 ** (10 + i) for i in range(n_sizes)]
    p = progress_for(nodes, repeats, sizes, train_steps)
    for ev in run_events(nodes, repeats, sizes, train_steps, pairs):
        p.observe(ev)
        assert all(p.counts[k] <= t for k, t in p.totals.items() if t is not None)
        assert p.completed <= p.total
    assert {k: p.counts[k] for k, t in p.totals.items() if t is not None} == \
        {k: t for k, t in p.totals.items() if t is not None}
    assert p.phase == "finishing"


def test_the_text_form_says_each_phase_once_it_starts_and_the_count_every_few_seconds():
    sizes = [1024, 2048]
    said, now = [], [0.0]
    p = progress_for(2, 1, sizes, 2, say=said.append, every_s=5.0, clock=lambda: now[0])
    p.observe(None)  # before any event: the node processes are starting (importing torch)
    assert len(said) == 1 and "starting" in said[0]
    now[0] = 3.0
    p.observe(None)
    assert len(said) == 1  # nothing new, not yet time for a reminder
    now[0] = 6.0
    p.observe(None)
    assert len(said) == 2 and "6 s" in said[1]  # a silent phase still says it is alive
    for ev in run_events(2, 1, sizes, 2, pairs=0)[:6]:  # forked, 2 ready, 2 sampled, 1st collective
        p.observe(ev)
    phases = [line.split(":")[1].split()[0] for line in said[2:]]
    assert phases == ["joining", "per-node", "collectives"]
    assert said[-1].endswith("collectives 1/10: all_reduce 1 KiB")


def test_each_phase_has_a_label_and_the_phases_come_in_the_workers_order():
    assert [k for k, _ in PHASES] == ["start", "join", "per_node", "collectives", "localise", "training",
                                      "finishing"]
