"""Localising a bad rail: the search itself, against a model of a fabric (no processes).

In the model a pair test reports the slower of its two nodes' links on that rail, which
is what a 2-rank all_reduce over one switch measures (tests/burnin/test_fabric_burnin.py
checks the real thing)."""

import random

import pytest

from aidc.burnin.localise import localise, ring_pairs


def model(link: dict[tuple[int, int], float], healthy: float = 0.9):
    """measure(rail, a, b) for nodes whose (node, rail) link carries `link` (default healthy)."""
    return lambda rail, a, b: min(link.get((a, rail), healthy), link.get((b, rail), healthy))


def test_ring_pairs_pair_each_node_with_its_successor_once():
    assert ring_pairs(1) == []
    assert ring_pairs(2) == [(0, 1)]
    assert ring_pairs(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]


@pytest.mark.parametrize("nodes", [3, 4, 5, 8, 17, 64, 257])
def test_one_degraded_rail_among_n_nodes_is_named_in_exactly_n_pair_tests_per_rail(nodes):
    rng = random.Random(nodes)
    culprit, rail = rng.randrange(nodes), rng.randrange(2)
    found = localise(nodes, 2, model({(culprit, rail): 0.31}), tolerance=0.35)
    assert [(c.node, c.rail) for c in found.culprits] == [(culprit, rail)]
    assert found.culprits[0].fraction == pytest.approx(0.31)
    assert found.culprits[0].fleet_median == pytest.approx(0.9)
    assert found.pair_tests == 2 * nodes  # O(N): never the N(N-1)/2 of all pairs
    assert found.culprits[0].reason([f"gpu-{i}" for i in range(nodes)]) == \
        f"gpu-{culprit} rail {rail}: busbw 31% of link rate (fleet median 90%)"


def test_a_healthy_fabric_names_nobody():
    found = localise(6, 2, model({}), tolerance=0.35)
    assert found.culprits == [] and found.unresolved == [] and found.pair_tests == 12


def test_a_uniformly_slow_fabric_has_no_single_culprit():
    found = localise(5, 1, model({}, healthy=0.2), tolerance=0.35)
    assert found.culprits == []


def test_a_slow_pair_alone_is_split_by_testing_each_end_against_a_healthy_node():
    # Of the ring pairs only 2-3 is slow (node 3's link fails under some traffic only): neither
    # end is in two slow pairs, so each end is tested against node 0, a healthy node.
    def measure(rail, a, b):
        return 0.3 if {a, b} in ({2, 3}, {0, 3}) else 0.9

    found = localise(6, 1, measure, tolerance=0.35)
    bisects = [t for t in found.tests if t.purpose == "bisect"]
    assert [(t.a, t.b) for t in bisects] == [(0, 2), (0, 3)] and found.pair_tests == 6 + 2
    assert [c.node for c in found.culprits] == [3]


def test_two_nodes_name_no_culprit_their_one_pair_is_its_own_reference():
    found = localise(2, 1, model({(1, 0): 0.2}), tolerance=0.35)
    # A 2-node fleet's busbw is judged against the floor only.
    assert found.culprits == [] and found.pair_tests == 1


def test_two_bad_nodes_on_different_rails_are_both_named():
    found = localise(8, 2, model({(2, 1): 0.3, (6, 0): 0.4}), tolerance=0.35)
    assert sorted((c.node, c.rail) for c in found.culprits) == [(2, 1), (6, 0)]
    assert found.pair_tests == 16


def test_a_slow_pair_whose_ends_are_both_fast_against_a_healthy_node_is_noted_not_blamed():
    # Intermittent trouble (packet loss under a loss-blind congestion control): the ring pair
    # 2-3 measured slow once, each end then measured fast.
    found = localise(5, 1, lambda rail, a, b: 0.3 if (a, b) == (2, 3) else 0.9, tolerance=0.35)
    assert found.culprits == [] and found.pair_tests == 5 + 2
    (unresolved,) = found.to_dict([f"gpu-{i}" for i in range(5)])["unresolved"]
    assert unresolved["note"] == ("rail 0: pair gpu-2-gpu-3 was slow (30% of link rate) but each end was fast"
                                  " against a healthy node (90%, 90%)")


def test_with_no_healthy_node_left_to_test_against_slow_pairs_are_noted_with_why():
    # A ring of four whose pairs 0-1 and 2-3 are slow: every node is in one slow pair.
    found = localise(4, 1, lambda rail, a, b: 0.3 if {a, b} in ({0, 1}, {2, 3}) else 0.9, tolerance=0.35)
    assert found.culprits == [] and found.pair_tests == 4
    notes = [u["note"] for u in found.to_dict(["a", "b", "c", "d"])["unresolved"]]
    assert notes == ["rail 0: pair a-b was slow (30% of link rate) but no healthy node is left to test its ends against",
                     "rail 0: pair c-d was slow (30% of link rate) but no healthy node is left to test its ends against"]
