"""The agent's node metrics: the newest burn-in certificate of this node in the audit log, the
checkpoint volume's fill level and whether the audit log verifies."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from aidc.audit.log import AuditLog
from aidc.device import sim
from aidc.device.sim import SimBackend
from aidc.health.agent import HealthAgent
from aidc.health.exporter import render
from aidc.store import Store
from tests.health.conftest import metric_value


@pytest.fixture
def agent(tmp_path):
    node_dir = sim.create_node(tmp_path / "n1", "n1", gpus=1)
    store, audit = Store(tmp_path / "store.db"), AuditLog(tmp_path / "audit.db")
    made = HealthAgent("n1", SimBackend(node_dir), None, store, audit,
                       checkpoint_paths=(str(tmp_path), str(tmp_path / "not-mounted")))
    yield made
    made.close()
    made.dev.close()
    store.close()
    audit.close()


def certificate(audit: AuditLog, node: str, verdict: str, **payload) -> None:
    audit.append("burnin.certificate", f"{verdict} burn-in", actor="test:burnin", node=node,
                 payload={"verdict": verdict, **payload})


def page(agent, at: float) -> str:
    agent.node_checks(now=at)
    return render(agent.metrics.registry).decode()


def test_without_a_certificate_there_is_no_burn_in_verdict(agent):
    assert metric_value(page(agent, 0), "aidc_burnin_passed") is None


def test_the_newest_certificate_of_this_node_gives_the_verdict_and_busbw_fractions(agent):
    rows = [{"bytes": b, "algbw_gbps": 1.0, "busbw_gbps": 1.0, "link_fraction": f} for b, f in ((4096, 0.2), (1 << 22, 0.8))]
    certificate(agent.audit, "n1", "pass", collectives={"all_gather": rows, "broadcast": rows[:1]})
    text = page(agent, 0)
    assert metric_value(text, "aidc_burnin_passed", Hostname="n1") == 1
    assert metric_value(text, "aidc_burnin_busbw_link_fraction", collective="all_gather") == 0.8, "the largest size"
    assert metric_value(text, "aidc_burnin_busbw_link_fraction", collective="broadcast") == 0.2
    certificate(agent.audit, "n1", "fail", reasons=["gemm below floor"])  # a newer run, before collectives existed
    certificate(agent.audit, "n2", "pass")  # another node's
    text = page(agent, 5)
    assert metric_value(text, "aidc_burnin_passed", Hostname="n1") == 1, "read at most every 10 s"
    text = page(agent, 11)
    assert metric_value(text, "aidc_burnin_passed", Hostname="n1") == 0
    assert metric_value(text, "aidc_burnin_busbw_link_fraction", collective="all_gather") is None


def test_the_certificate_s_figures_against_the_fleet_median_are_the_relative_perf_per_burn_in_test(agent):
    stats = {"gemm_bf16_tflops": {"median": 2.0}, "allreduce_busbw_gbps": {"median": 0.5},
             "memcpy_gbps": {"median": 0.0}}  # a zero median says nothing about this node
    certificate(agent.audit, "n1", "fail", metrics={"gemm_bf16_tflops": 1.4, "allreduce_busbw_gbps": 0.5,
                                                     "memcpy_gbps": 3.0}, fleet={"stats": stats})
    agent.metrics.straggler_window(0.01, 0.002, 0.97)  # the training judgement's own series
    text = page(agent, 0)
    assert metric_value(text, "aidc_burnin_relative_perf", Hostname="n1", test="gemm_bf16_tflops") == 0.7
    assert metric_value(text, "aidc_burnin_relative_perf", Hostname="n1", test="allreduce_busbw_gbps") == 1.0
    assert metric_value(text, "aidc_burnin_relative_perf", Hostname="n1", test="memcpy_gbps") is None
    certificate(agent.audit, "n1", "pass", metrics={"memcpy_gbps": 3.0}, fleet={"stats": {"memcpy_gbps": {"median": 3.0}}})
    text = page(agent, 11)
    assert metric_value(text, "aidc_burnin_relative_perf", Hostname="n1", test="memcpy_gbps") == 1.0
    assert metric_value(text, "aidc_burnin_relative_perf", Hostname="n1", test="gemm_bf16_tflops") is None, \
        "a newer certificate replaces the older one's figures"
    assert metric_value(text, "aidc_burnin_relative_perf", Hostname="n1", test="train_step") == 0.97


def test_an_unreadable_certificate_leaves_the_verdict_out_and_is_logged_once(agent, caplog):
    certificate(agent.audit, "n1", "maybe")
    with caplog.at_level(logging.WARNING, logger="aidc.health"):
        assert metric_value(page(agent, 0), "aidc_burnin_passed") is None
        page(agent, 20)
    assert len([r for r in caplog.records if "burn-in certificate" in r.getMessage()]) == 1


def test_checkpoint_volume_fill_level_and_an_unmounted_path_left_out(agent, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aidc.health"):
        text = page(agent, 0)
        page(agent, 20)
    assert 0 < metric_value(text, "aidc_checkpoint_volume_used_ratio", path=str(tmp_path)) < 1
    assert metric_value(text, "aidc_checkpoint_volume_used_ratio", path=str(tmp_path / "not-mounted")) is None
    assert len([r for r in caplog.records if "not-mounted" in r.getMessage()]) == 1


def test_a_tampered_audit_log_reads_as_verification_failed(agent):
    agent.audit.append("test.note", "something happened", actor="test:x")
    assert metric_value(page(agent, 0), "aidc_audit_verify_ok", Hostname="n1") == 1
    db = sqlite3.connect(agent.audit.path)
    db.execute("UPDATE audit SET reason = 'nothing happened' WHERE kind = 'test.note'")
    db.commit()
    db.close()
    assert metric_value(page(agent, 30), "aidc_audit_verify_ok") == 1, "verified at most every 60 s"
    assert metric_value(page(agent, 61), "aidc_audit_verify_ok") == 0
