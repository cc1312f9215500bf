"""End to end: the lab trainer's real data-parallel ranks report their step phases, a node
slowed through its simulated GPU is named a straggler by its agent, and no other node is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "stragglers.py"


@pytest.mark.slow
def test_a_slowed_node_is_found_by_its_agent_and_no_other_node_is():
    out = subprocess.run([sys.executable, str(BENCH), "--trials", "2", "--nodes", "3", "--factor", "1.5",
                          "--clean-steps", "20", "--seed", "11", "--json"],
                         capture_output=True, text=True, timeout=600, check=False)
    figures = json.loads(out.stdout)
    assert figures["trials"] == 2 and figures["mode"] == "compute"
    assert figures["recall"] == 1.0, figures["per_trial"]
    assert figures["false_positives"] == 0, figures["false_positive_events"]
    assert out.returncode == 0


def test_the_bench_refuses_a_fleet_too_small_for_a_median():
    out = subprocess.run([sys.executable, str(BENCH), "--nodes", "2"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 2 and "--nodes >= 3" in out.stderr


@pytest.mark.slow
def test_a_node_whose_rail_is_cut_to_half_is_found_by_its_link_probe_and_the_fabric_is_removed_after():
    from aidc.lab import fabric

    why = fabric.probe_namespaces("aidctestprobe")
    if why is not None:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    out = subprocess.run([sys.executable, str(BENCH), "--mode", "rail", "--trials", "1", "--nodes", "3",
                          "--clean-steps", "20", "--seed", "3", "--json"],
                         capture_output=True, text=True, timeout=600, check=False)
    figures = json.loads(out.stdout)
    [trial] = figures["per_trial"]
    assert trial["mode"] == "rail" and trial["detected"], figures
    assert f"rail {trial['rail']}: both ring links slow" in trial["reason"]
    assert figures["false_positives"] == 0, figures["false_positive_events"]
    assert figures["fabric_tag"] and fabric.list_namespaces(figures["fabric_tag"]) == []  # removed after
    assert out.returncode == 0


def test_the_bench_refuses_a_rail_the_fabric_does_not_have():
    out = subprocess.run([sys.executable, str(BENCH), "--mode", "rail", "--rails", "2", "--rail", "2"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "--rail < --rails" in out.stderr
