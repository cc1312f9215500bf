"""Shared test fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIDC_ROOT", str(ROOT))
# Subprocesses (`python -m aidc ...`) import this checkout's package, not another copy.
os.environ["PYTHONPATH"] = str(ROOT / "agents") + os.pathsep + os.environ.get("PYTHONPATH", "")


@pytest.fixture
def aidc_cli():
    """Run the aidc CLI as a user would, in a subprocess; returns CompletedProcess."""
    import subprocess

    def run(*args: str, check: bool = False, timeout: float = 120, **kw):
        return subprocess.run([sys.executable, "-m", "aidc", *args], capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    return run
