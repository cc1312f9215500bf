"""Builds of the shipped stack files under Pulumi mocks, made once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (HERE, ROOT / "infra", ROOT / "policy"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Test modules import ROOT and build_of from pulumi_harness, not from `conftest`: several test
# directories have a conftest.py, and which one `import conftest` finds depends on collection order.
from pulumi_harness import Build, build_of  # noqa: E402


@pytest.fixture(scope="session")
def h100() -> Build:
    return build_of(ROOT / "Pulumi.h100-example.yaml")


@pytest.fixture(scope="session")
def lab() -> Build:
    return build_of(ROOT / "Pulumi.lab.yaml")


@pytest.fixture(scope="session")
def stack_files() -> list[Path]:
    return sorted(ROOT.glob("Pulumi.*.yaml"))
