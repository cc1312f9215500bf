"""The crypto bench runs both paths on one state and reports the ratios it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_save_and_load_ratios_of_a_verified_round_trip(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint_crypto.py"), "--mib", "4", "--repeats", "1",
                          "--dir", str(tmp_path), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mib"] == 4 and result["cipher"] == "AES-256-GCM" and result["key_version"] == 1
    assert result["save_ratio"] > 0 and result["load_ratio"] > 0 and isinstance(result["goal_met"], bool)
    assert result["save_ratio_paired"] > 0 and result["load_ratio_paired"] > 0
    assert result["save_ratio_cpu"] > 0 and result["load_ratio_cpu"] > 0
    # The single-thread load runs beside the parallel one, as the baseline of its gain.
    assert result["load_ratio_1thread"] > 0 and result["decrypt_threads"] >= 2
    # One repeat: the per-repeat pair is the whole run, so its ratio is the ratio of the medians.
    assert abs(result["load_ratio_paired"] - result["load_ratio"]) < 0.002
    assert len(result["loadavg_1min"]) == 2 and all(x >= 0 for x in result["loadavg_1min"])
    assert all(len(v) == 1 for v in result["seconds"].values())
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


def test_bench_refuses_nonsense_sizes():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint_crypto.py"), "--mib", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("aidc: error:") and "Traceback" not in out.stderr
