"""Collective figures use nccl-tests' definitions exactly (doc/PERFORMANCE.md): algbw = S/t,
busbw = algbw x the op's bus factor, S as nccl-tests sizes each op; every op checks its result."""

import pytest
import torch.distributed as dist

from aidc.burnin.collectives import (COLLECTIVES, _Op, algbw_gbps, busbw_gbps, collective_sweep, iterations_for,
                                     metric_name, node_busbw, sweep_sizes, with_link_fraction)


@pytest.fixture
def single_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_algbw_is_bytes_over_time_in_gigabytes_per_second():
    assert algbw_gbps(4_000_000_000, 2.0) == pytest.approx(2.0)


@pytest.mark.parametrize("ranks, factor", [(1, 0.0), (2, 1.0), (4, 1.5), (5, 1.6), (8, 1.75)])
def test_allreduce_busbw_is_algbw_times_two_n_minus_one_over_n(ranks, factor):
    assert busbw_gbps(1_000_000_000, 1.0, ranks) == pytest.approx(1.0 * factor)


@pytest.mark.parametrize("op, factor", [("all_gather", 0.75), ("reduce_scatter", 0.75), ("all_to_all", 0.75),
                                        ("broadcast", 1.0)])
def test_other_collectives_use_their_own_bus_factor(op, factor):
    assert busbw_gbps(1_000_000_000, 1.0, 4, op) == pytest.approx(factor)


def test_sweep_is_every_power_of_two_from_min_to_max_inclusive():
    assert sweep_sizes(4096, 65536) == [4096, 8192, 16384, 32768, 65536]


def test_sweep_rounds_a_non_power_of_two_minimum_up():
    assert sweep_sizes(5000, 20000) == [8192, 16384]


def test_small_messages_get_more_timed_iterations_than_large_ones():
    assert iterations_for(4096) > iterations_for(64 * 1024 * 1024) >= 3


def test_every_collective_has_a_node_metric_named_like_allreduce_busbw():
    assert [metric_name(op) for op in COLLECTIVES] == [
        "allreduce_busbw_gbps", "allgather_busbw_gbps", "reducescatter_busbw_gbps", "broadcast_busbw_gbps",
        "alltoall_busbw_gbps"]


def test_size_is_the_whole_buffer_for_all_reduce_and_n_chunks_for_the_others(monkeypatch, single_rank_group):
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 5)  # buffer shapes only: no collective is called
    whole = _Op("all_reduce", 4096, "cpu")
    assert (whole.nbytes, whole.buf.numel()) == (4096, 1024)
    gather = _Op("all_gather", 4096, "cpu")  # S = the gathered output: 5 chunks of 204 floats
    assert (gather.nbytes, gather.inp.numel(), gather.out.numel()) == (4080, 204, 1020)
    scatter = _Op("reduce_scatter", 4096, "cpu")  # S = the whole input
    assert (scatter.nbytes, scatter.inp.numel(), scatter.out.numel()) == (4080, 1020, 204)
    a2a = _Op("all_to_all", 4096, "cpu")  # S = one rank's whole send buffer
    assert (a2a.nbytes, a2a.inp.numel(), a2a.out.numel()) == (4080, 1020, 1020)


@pytest.mark.parametrize("op", COLLECTIVES)
def test_each_collective_runs_its_sweep_and_its_check_holds(op, single_rank_group):
    rows = collective_sweep(op, "cpu", [4096, 8192])
    assert [r.bytes for r in rows] == [4096, 8192] and all(r.correct for r in rows)
    assert all(r.time_us > 0 and r.algbw_gbps == pytest.approx(r.bytes / r.time_us / 1e3) for r in rows)


def test_an_unknown_collective_is_refused(single_rank_group):
    with pytest.raises(ValueError, match="collective must be one of"):
        collective_sweep("all_reduce_v2", "cpu", [4096])


def test_link_fraction_is_busbw_over_the_link_rate_in_bytes():
    raw = [{"bytes": 4096, "iterations": 3, "correct": True, "time_us": 100.0, "algbw_gbps": 2.0, "busbw_gbps": 3.0,
            "own_time_us": 50.0, "own_busbw_gbps": 6.0}]
    [fleet] = with_link_fraction(raw, 12.5)  # a 100 Gb/s link
    assert fleet == {"bytes": 4096, "iterations": 3, "correct": True, "time_us": 100.0, "algbw_gbps": 2.0,
                     "busbw_gbps": 3.0, "link_fraction": 0.24, "above_link_rate": False}
    [own] = with_link_fraction(raw, 12.5, own=True)
    assert (own["time_us"], own["busbw_gbps"], own["link_fraction"]) == (50.0, 6.0, 0.48)
    assert own["algbw_gbps"] == pytest.approx(4096 / 50e-6 / 1e9)


def test_a_bus_bandwidth_above_the_link_rate_is_flagged_not_taken_as_a_result():
    """busbw is scaled to compare with one link: 133% of it is a measurement or link-rate error."""
    raw = [{"bytes": 4096, "iterations": 3, "correct": True, "time_us": 100.0, "algbw_gbps": b, "busbw_gbps": b,
            "own_time_us": 100.0, "own_busbw_gbps": b} for b in (12.5, 16.625)]
    assert [(r["link_fraction"], r["above_link_rate"]) for r in with_link_fraction(raw, 12.5)] == \
        [(1.0, False), (1.33, True)]


@pytest.mark.parametrize("op, function", [
    ("all_reduce", "all_reduce"), ("broadcast", "broadcast"), ("all_gather", "all_gather_single"),
    ("reduce_scatter", "reduce_scatter_single"), ("all_to_all", "all_to_all_single")])
def test_a_collective_that_returns_wrong_values_fails_its_check(op, function, monkeypatch, single_rank_group):
    real = getattr(dist, function)

    def off_by_one(*args, **kwargs):
        work = real(*args, **kwargs)
        args[0].add_(1)  # the result buffer, one off everywhere
        return work

    monkeypatch.setattr(dist, function, off_by_one)
    [row] = collective_sweep(op, "cpu", [4096])
    assert row.correct is False


def test_a_nodes_busbw_is_bus_bytes_over_time_across_the_largest_sizes():
    rows = [{"busbw_gbps": 99.0, "time_us": 1.0, "iterations": 10},  # the smallest size: not counted
            {"busbw_gbps": 1.0, "time_us": 100.0, "iterations": 10},
            {"busbw_gbps": 2.0, "time_us": 100.0, "iterations": 10},
            {"busbw_gbps": 4.0, "time_us": 200.0, "iterations": 5}]
    # time-weighted: (1 x 1000 + 2 x 1000 + 4 x 1000) / 3000 us
    assert node_busbw(rows) == pytest.approx(7 / 3)
    assert node_busbw(rows[-1:]) == 4.0
