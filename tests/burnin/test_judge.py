"""Judging nodes: fleet median with a tolerance, floors, training checks; a reason for every failure."""

import pytest

from aidc.burnin.judge import judge, mad, robust_z
from aidc.burnin.report import BurninReport, NodeResult

TRAINED = {"loss_before": 1.0, "loss_after": 0.2, "param_digest": "a" * 64, "steps": 10}
SHARDED = {**TRAINED, "param_digest": "f" * 64, "max_abs_diff_vs_ddp": 6e-8}
LINK_GBPS = 1.25  # a 10 Gb/s link


def rows(busbw=1.0, correct=True):
    """A two-size sweep whose largest size reached `busbw` GB/s."""
    return [{"bytes": 4096, "busbw_gbps": busbw / 10, "link_fraction": busbw / 10 / LINK_GBPS, "correct": True},
            {"bytes": 4194304, "busbw_gbps": busbw, "link_fraction": busbw / LINK_GBPS, "correct": correct}]


def fleet(**fp32):
    return {name: NodeResult(name, "SIM", False,
                             metrics={"gemm_fp32_tflops": v, "gemm_bf16_tflops": 1.0, "memcpy_gbps": 10.0},
                             training=dict(TRAINED), parallel={"fsdp": dict(SHARDED), "pipeline": dict(SHARDED)})
            for name, v in fp32.items()}


def with_collectives(nodes, **busbw_by_node):
    for name, n in nodes.items():
        n.collectives = {"all_reduce": rows(), "all_gather": rows(busbw_by_node.get(name, 1.0))}
        n.metrics.update(allreduce_busbw_gbps=1.0, allgather_busbw_gbps=busbw_by_node.get(name, 1.0))
    return nodes


def run(nodes, floors=None, tolerance=0.25, min_loss_drop=0.1, min_busbw_fraction=0.25, busbw_tolerance=None,
        bad_link_on=frozenset()):
    return judge(nodes, floors or {}, tolerance, min_loss_drop, link_rate_gbps=LINK_GBPS,
                 min_busbw_fraction=min_busbw_fraction, busbw_tolerance=busbw_tolerance, bad_link_on=bad_link_on)


def test_a_healthy_fleet_with_noise_inside_the_tolerance_passes():
    nodes = fleet(a=2.4, b=2.3, c=2.5, d=2.0)
    run(nodes)
    assert all(n.passed and not n.reasons for n in nodes.values())


def test_a_node_far_below_the_fleet_median_fails_with_the_median_in_the_reason():
    nodes = fleet(a=2.4, b=2.4, c=2.5, d=0.9, e=2.3)
    stats = run(nodes)
    assert stats["gemm_fp32_tflops"]["median"] == 2.4
    assert not nodes["d"].passed
    assert nodes["d"].reasons == ["gemm_fp32_tflops 0.9 TFLOP/s is 62% below the fleet median 2.4 TFLOP/s"
                                  " (tolerance 25%)"]
    assert all(nodes[n].passed for n in "abce")


def test_the_median_is_robust_to_two_slow_nodes_out_of_five():
    nodes = fleet(a=2.4, b=2.4, c=2.4, d=0.5, e=0.6)
    run(nodes)
    assert [n for n, r in nodes.items() if not r.passed] == ["d", "e"]


def test_a_fast_node_never_fails_the_fleet_check():
    nodes = fleet(a=2.4, b=2.4, c=9.0)
    run(nodes)
    assert nodes["c"].passed


def test_mad_z_score_is_reported_but_a_tiny_mad_alone_does_not_fail_a_node():
    nodes = fleet(a=2.40, b=2.40, c=2.40, d=2.30)  # MAD 0: d has an infinite z-score, 4% slow
    run(nodes)
    assert nodes["d"].passed
    assert nodes["d"].robust_z["gemm_fp32_tflops"] is None  # infinite: not representable in JSON
    assert nodes["a"].robust_z["gemm_fp32_tflops"] == 0.0


def test_robust_statistics_helpers():
    assert mad([1, 2, 3, 4, 100]) == 1
    assert robust_z(5.0, 3.0, 1.0) == pytest.approx(0.6745 * 2)


def test_a_fleet_uniformly_below_the_floor_fails_every_node_naming_the_floor():
    nodes = fleet(a=1.0, b=1.0, c=1.0)
    run(nodes, floors={n: {"gemm_fp32_tflops": 37.0} for n in nodes})
    for n in nodes.values():
        assert n.reasons == ["gemm_fp32_tflops 1 TFLOP/s is below the SIM floor 37 TFLOP/s"]


def test_a_floor_for_something_not_measured_is_noted_not_silently_skipped():
    nodes = fleet(a=1.0, b=1.0)
    run(nodes, floors={"a": {"nvlink_gbps": 100.0}})
    assert nodes["a"].passed and any("nvlink_gbps" in note for note in nodes["a"].notes)


def test_a_lone_node_gets_a_note_that_the_fleet_comparison_was_skipped():
    nodes = fleet(a=1.0)
    run(nodes)
    assert nodes["a"].passed and any("skipped" in note for note in nodes["a"].notes)


def test_loss_that_does_not_fall_fails_the_node_with_both_losses():
    nodes = fleet(a=2.4, b=2.4, c=2.4)
    nodes["b"].training.update(loss_before=1.0, loss_after=0.95)
    run(nodes, min_loss_drop=0.1)
    assert nodes["b"].reasons == ["training loss did not fall enough: 1 -> 0.95 (needs a 10% drop)"]
    assert nodes["a"].passed and nodes["c"].passed


def test_parameters_differing_on_one_rank_fail_that_node_as_silent_data_corruption():
    nodes = fleet(a=2.4, b=2.4, c=2.4)
    nodes["c"].training["param_digest"] = "b" * 64
    run(nodes)
    assert not nodes["c"].passed and "silent data corruption" in nodes["c"].reasons[0]
    assert nodes["a"].passed and nodes["b"].passed


def test_a_measurement_error_and_a_wrong_allreduce_sum_fail_the_node():
    nodes = fleet(a=2.4, b=2.4, c=2.4)
    nodes["a"].errors = ["gpu 0: GPU 0 is lost: fallen off the bus"]
    with_collectives(nodes)
    nodes["b"].collectives["all_reduce"] = rows(correct=False)
    run(nodes)
    assert nodes["a"].reasons == ["measurement failed: gpu 0: GPU 0 is lost: fallen off the bus"]
    assert nodes["b"].reasons == ["all_reduce returned a wrong result on this node (at 4194304 B)"]


def test_a_collective_below_the_policy_fraction_of_the_link_rate_fails_naming_the_figures():
    nodes = with_collectives(fleet(a=2.4, b=2.4, c=2.4), a=0.2, b=0.2, c=0.2)  # 16% of 1.25 GB/s
    run(nodes, min_busbw_fraction=0.25)
    for n in nodes.values():
        assert n.reasons == ["all_gather busbw 0.2 GB/s (largest sizes, up to 4194304 B) is 16.0% of the link rate"
                             " 1.25 GB/s (policy floor 25%)"]


def test_a_floor_miss_that_a_localised_bad_link_explains_is_a_note_on_every_node():
    nodes = with_collectives(fleet(a=2.4, b=2.4, c=2.4), a=0.2, b=0.2, c=0.2)
    run(nodes, min_busbw_fraction=0.25, bad_link_on={"b"})
    for n in nodes.values():
        assert n.passed and n.reasons == []  # the caller fails b with the localised reason
        assert ("all_gather busbw 0.2 GB/s (largest sizes, up to 4194304 B) is 16.0% of the link rate 1.25 GB/s"
                " (policy floor 25%): the fleet figure, explained by the bad link localised on b") in n.notes


def test_a_zero_busbw_floor_checks_nothing_but_the_fleet_still_compares():
    nodes = with_collectives(fleet(a=2.4, b=2.4, c=2.4), a=0.2, b=0.2, c=0.2)
    run(nodes, min_busbw_fraction=0.0)
    assert all(n.passed for n in nodes.values())


def test_a_node_whose_collective_busbw_is_far_below_the_fleet_median_fails():
    nodes = with_collectives(fleet(a=2.4, b=2.4, c=2.4, d=2.4), a=1.0, b=1.0, c=1.0, d=0.4)
    stats = run(nodes, min_busbw_fraction=0.0)
    assert stats["allgather_busbw_gbps"]["median"] == 1.0
    assert nodes["d"].reasons == ["allgather_busbw_gbps 0.4 GB/s is 60% below the fleet median 1 GB/s"
                                  " (tolerance 25%)"]
    assert all(nodes[n].passed for n in "abc")


def test_collective_busbw_is_compared_with_its_own_tolerance_and_gemm_with_the_fleet_tolerance():
    nodes = with_collectives(fleet(a=2.4, b=2.4, c=2.4, d=1.5), a=1.0, b=1.0, c=1.0, d=0.5)  # both 50% / 37% low
    run(nodes, min_busbw_fraction=0.0, tolerance=0.25, busbw_tolerance=0.6)
    assert nodes["d"].reasons == ["gemm_fp32_tflops 1.5 TFLOP/s is 38% below the fleet median 2.4 TFLOP/s"
                                  " (tolerance 25%)"]
    run(nodes, min_busbw_fraction=0.0, tolerance=0.25, busbw_tolerance=0.4)
    assert nodes["d"].reasons[1] == "allgather_busbw_gbps 0.5 GB/s is 50% below the fleet median 1 GB/s (tolerance 40%)"


def test_sharded_and_pipeline_runs_are_checked_like_ddp_each_with_its_name():
    nodes = fleet(a=2.4, b=2.4, c=2.4)
    nodes["a"].parallel["fsdp"].update(loss_after=0.99)
    nodes["b"].parallel["pipeline"]["param_digest"] = "e" * 64
    nodes["c"].parallel["pipeline"]["max_abs_diff_vs_ddp"] = 0.01
    run(nodes)
    assert nodes["a"].reasons == ["FSDP training loss did not fall enough: 1 -> 0.99 (needs a 10% drop)"]
    assert len(nodes["b"].reasons) == 1 and nodes["b"].reasons[0].startswith(
        "parameters after pipeline training differ from the 2 of 3 ranks that agree")
    assert nodes["c"].reasons == ["parameters after pipeline training differ from the DDP run's by up to 0.01"
                                  " (rounding allows 0.0001)"]


def test_a_training_run_that_did_not_report_fails_the_node():
    nodes = fleet(a=2.4, b=2.4)
    del nodes["b"].parallel["pipeline"]
    run(nodes)
    assert nodes["b"].reasons == ["the pipeline training run did not report"] and nodes["a"].passed


def test_a_node_that_measured_nothing_without_an_error_is_not_passed():
    nodes = fleet(a=2.4, b=2.4)
    nodes["b"].metrics = {}
    run(nodes)
    assert not nodes["b"].passed and "gemm_fp32_tflops was not measured" in nodes["b"].reasons


def test_report_lists_certified_and_failed_nodes_and_serialises():
    nodes = fleet(a=2.4, b=2.4, c=0.5)
    run(nodes)
    report = BurninReport("lab", nodes, {"stats": {}})
    d = report.to_dict()
    assert (d["passed"], d["certified_nodes"], d["failed_nodes"]) == (False, ["a", "b"], ["c"])
    assert d["verdicts"] == {"a": "pass", "b": "pass", "c": "fail"}
    assert d["units"]["gemm_fp32_tflops"] == "TFLOP/s"


def test_report_json_carries_the_collective_rows_beside_the_link_rate_once():
    sweep = {"all_gather": rows()}
    report = BurninReport("lab", fleet(a=2.4), {"stats": {}, "collectives": sweep, "link_rate_gbps": LINK_GBPS,
                                                "step_time_ms": {"ddp": 5.0, "fsdp": 30.0, "pipeline": 12.0}})
    d = report.to_dict()
    assert d["collectives"] == sweep and d["link_rate_gbps"] == 1.25 and "collectives" not in d["fleet"]
    assert d["step_time_ms"] == {"ddp": 5.0, "fsdp": 30.0, "pipeline": 12.0}
