"""The burn-in policy fields of the cluster spec, and the lab stack's burn-in sizes."""

import pytest

from aidc.errors import SpecError
from aidc.spec import load_stack, parse_spec

POOL = [{"name": "gpu", "count": 2, "gpu_model": "SIM", "gpus_per_node": 1}]


def test_burnin_policy_defaults_suit_a_real_gpu():
    burnin = parse_spec({"name": "c", "node_pools": POOL}).policy.burnin
    assert (burnin.memcpy_bytes, burnin.repeats, burnin.min_loss_drop) == (256 * 1024 * 1024, 5, 0.1)
    assert (burnin.min_busbw_fraction, burnin.busbw_fleet_tolerance) == (0.25, 0.25)


@pytest.mark.parametrize("key, value", [("memcpy_bytes", 16), ("repeats", 0), ("min_loss_drop", 1.0),
                                        ("min_busbw_fraction", 1.5), ("min_busbw_fraction", -0.1),
                                        ("min_busbw_fraction", "0.5"), ("min_busbw_fraction", 1.0),
                                        ("busbw_fleet_tolerance", 0), ("busbw_fleet_tolerance", 1.0)])
def test_out_of_range_burnin_values_name_their_key(key, value):
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "c", "node_pools": POOL, "policy": {"burnin": {key: value}}})
    assert err.value.key == f"aidc:cluster.policy.burnin.{key}"


def test_lab_stack_sizes_burn_in_small_enough_for_two_cores():
    burnin = load_stack("lab").policy.burnin
    assert burnin.gemm_size <= 512 and burnin.memcpy_bytes <= 64 * 1024 * 1024
    assert burnin.allreduce_max_bytes <= 4 * 1024 * 1024
    # a 4x-slowed node must fall outside the tolerance: 75% below the median
    assert burnin.fleet_tolerance < 0.75
