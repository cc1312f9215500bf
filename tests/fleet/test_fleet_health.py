"""The fleet-health figure: certified, in-service GPUs over installed GPUs, replayed from the
audit log; `aidc fleet health` answers for now, a past time and a window (the drop and the
recovery); the controller's /metrics exports the same figure."""

from __future__ import annotations

import json

import pytest

from aidc.audit.log import AuditLog
from aidc.errors import AidcError
from aidc.fleet.figure import Rules, audit_records, compare, figure_at, parse_instant
from aidc.spec import load_stack

from .conftest import VICTIM

PARTS = ("installed_gpus", "certified_gpus", "in_service_gpus", "healthy_gpus")


def figure(db, at: float) -> dict:
    with AuditLog(db, read_only=True) as log:
        return figure_at(load_stack("lab"), audit_records(log, Rules.shipped()), at)


def test_the_figure_counts_installed_certified_and_in_service_gpus_per_pool(fleet_lab):
    _, db, moments = fleet_lab
    # Before the fault: 5 nodes of 2 GPUs installed (the spare too); gpu-2 failed burn-in.
    before = figure(db, moments["before_fault"])
    assert {k: before["fleet"][k] for k in PARTS} == {"installed_gpus": 10, "certified_gpus": 8,
                                                      "in_service_gpus": 10, "healthy_gpus": 8}
    assert before["fleet"]["healthy_gpu_ratio"] == 0.8 and before["pools"] == {"gpu": before["fleet"]}
    # The faulty node quarantined: its two certified GPUs are out of service.
    during = figure(db, moments["quarantined"])
    assert {k: during["fleet"][k] for k in PARTS} == {"installed_gpus": 10, "certified_gpus": 8,
                                                      "in_service_gpus": 8, "healthy_gpus": 6}


def test_a_past_answer_does_not_change_when_later_records_arrive(fleet_lab):
    _, db, moments = fleet_lab
    # The log now also holds the release; asking for the quarantine's moment still says 0.6.
    assert figure(db, moments["quarantined"])["fleet"]["healthy_gpu_ratio"] == 0.6
    assert figure(db, moments["released"])["fleet"]["healthy_gpu_ratio"] == 0.8


def test_compare_across_the_fault_shows_the_drop_and_the_recovery(aidc_cli, fleet_lab):
    lab_dir, db, moments = fleet_lab
    out = aidc_cli("fleet", "health", "--stack", "lab", "--audit-db", str(db), "--json",
                   "--compare", str(moments["before_fault"]), str(moments["released"] + 1))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["before"]["fleet"]["healthy_gpu_ratio"] == 0.8
    assert result["lowest_fleet_ratio"] == 0.6 and result["dropped"] and result["recovered"]
    assert result["after"]["fleet"]["healthy_gpu_ratio"] == 0.8 and result["delta"]["fleet"]["healthy_gpus"] == 0
    moves = [(c["kind"], c["node"], c["fleet_ratio"]) for c in result["changes"]]
    assert moves == [("failover.action", VICTIM, 0.6), ("failover.release", VICTIM, 0.8)]
    assert result["changes"][1]["by"] == "user:ops"


def test_health_now_gives_the_figure_and_its_parts_as_json_and_text(aidc_cli, fleet_lab):
    lab_dir, db, _ = fleet_lab
    out = aidc_cli("fleet", "health", "--state-dir", str(lab_dir.parent), "--stack", "lab", "--json")  # STATE_DIR/audit.db
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["fleet"] == {"healthy_gpu_ratio": 0.8, "installed_gpus": 10, "certified_gpus": 8,
                               "in_service_gpus": 10, "healthy_gpus": 8}
    assert answer["definition"].startswith("healthy_gpu_ratio =") and answer["rules_version"] == Rules.shipped().version
    text = aidc_cli("fleet", "health", "--audit-db", str(db), "--pool", "gpu")
    assert "80.0% healthy (8 of 10 GPUs installed; 8 certified, 10 in service)" in text.stdout


@pytest.mark.parametrize("args, says", [
    (["--pool", "tpu"], "no pool 'tpu'"),
    (["--compare", "2000", "yesterday"], "is not a time"),
])
def test_bad_input_is_one_clear_error(aidc_cli, fleet_lab, args, says):
    _, db, _ = fleet_lab
    out = aidc_cli("fleet", "health", "--audit-db", str(db), "--json", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert says in json.loads(out.stderr)["error"]


def test_a_window_that_ends_before_it_starts_is_refused(fleet_lab):
    with pytest.raises(AidcError, match="is before T1"):
        compare(load_stack("lab"), [], 2000.0, 1000.0)


def test_instants_read_as_unix_seconds_or_iso_8601_in_utc():
    assert parse_instant("1800000000") == 1.8e9
    assert parse_instant("2027-01-15T08:00:00Z") == parse_instant("2027-01-15T08:00:00") == 1.8e9
    with pytest.raises(AidcError):
        parse_instant("soon")


def test_a_gpu_level_quarantine_takes_out_one_gpu_and_goodput_is_shown_beside(fleet_lab):
    from aidc.audit.log import AuditRecord
    from aidc.fleet.figure import Replay

    def record(seq, kind, node, payload, reason=""):
        return AuditRecord(seq, float(seq), "test", node, kind, reason, payload, "", "")

    replay = Replay(load_stack("lab"))
    for seq, node in enumerate(["gpu-0", "gpu-1"], 1):
        replay.apply(record(seq, "burnin.certificate", node, {"verdict": "pass", "failed_gpus": []}))
    assert replay.apply(record(3, "failover.action", "gpu-0", {"gpu": 1}))
    assert replay.standings["gpu-0"].health == "degraded"
    replay.apply(record(4, "goodput.report", None, {"goodput": {"job": "llm", "ettr": 0.9}}))
    # A dry run changes nothing.
    assert not replay.apply(record(5, "failover.action", "gpu-1", {"dry_run": True}))
    answer = replay.answer(5.0)
    assert answer["fleet"]["healthy_gpus"] == 3 and answer["goodput"]["ettr"] == 0.9
    # The running totals are the sum of the standings.
    from aidc.fleet.figure import Capacity
    assert replay.pool_capacity()["gpu"] == sum((st.capacity() for st in replay.standings.values()), Capacity(0, 0, 0, 0))


def test_the_controllers_metrics_export_the_figure_and_its_parts_per_pool(fleet_lab, tmp_path):
    from aidc.failover.metrics import FailoverMetrics

    _, db, _ = fleet_lab
    metrics = FailoverMetrics()
    metrics.add_fleet_health(load_stack("lab"), db)
    text = metrics.text()
    assert 'aidc_fleet_healthy_gpu_ratio{pool="gpu"} 0.8' in text
    for part, value in (("installed", 10), ("certified", 8), ("in_service", 10), ("healthy", 8)):
        assert f'aidc_fleet_{part}_gpus{{pool="gpu"}} {value}.0' in text
    assert "aidc_failover_breaker_open" in text  # beside the controller's own


def test_the_shipped_rules_parse_and_bad_rules_are_refused():
    rules = Rules.shipped()
    assert "burnin.certificate" in rules.certified_by and "failover.action" in rules.out_of_service
    with pytest.raises(AidcError, match="out_of_service"):
        Rules.parse({"version": "1", "certified_by": ["x"], "out_of_service": [], "back_in_service": ["y"],
                     "goodput": ["z"]}, "test")
