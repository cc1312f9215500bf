"""all_reduce figures use nccl-tests' definitions exactly."""

import pytest

from aidc.burnin.collectives import algbw_gbps, busbw_gbps, iterations_for, sweep_sizes


def test_algbw_is_bytes_over_time_in_gigabytes_per_second():
    assert algbw_gbps(4_000_000_000, 2.0) == pytest.approx(2.0)


@pytest.mark.parametrize("ranks, factor", [(1, 0.0), (2, 1.0), (4, 1.5), (5, 1.6), (8, 1.75)])
def test_allreduce_busbw_is_algbw_times_two_n_minus_one_over_n(ranks, factor):
    assert busbw_gbps(1_000_000_000, 1.0, ranks) == pytest.approx(1.0 * factor)


@pytest.mark.parametrize("op, factor", [("all_gather", 0.75), ("reduce_scatter", 0.75), ("broadcast", 1.0)])
def test_other_collectives_use_their_own_bus_factor(op, factor):
    assert busbw_gbps(1_000_000_000, 1.0, 4, op) == pytest.approx(factor)


def test_sweep_is_every_power_of_two_from_min_to_max_inclusive():
    assert sweep_sizes(4096, 65536) == [4096, 8192, 16384, 32768, 65536]


def test_sweep_rounds_a_non_power_of_two_minimum_up():
    assert sweep_sizes(5000, 20000) == [8192, 16384]


def test_small_messages_get_more_timed_iterations_than_large_ones():
    assert iterations_for(4096) > iterations_for(64 * 1024 * 1024) >= 3
