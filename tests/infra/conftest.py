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

from pulumi_harness import Build, run_program  # noqa: E402

_builds: dict[str, Build] = {}


def build_of(stack_file: Path) -> Build:
    key = str(stack_file)
    if key not in _builds:
        _builds[key] = run_program(stack_file)
    return _builds[key]


@pytest.fixture(scope="session")
def h100() -> Build:
    return build_of(ROOT / "Pulumi.h100-example.yaml")


@pytest.fixture(scope="session")
def lab() -> Build:
    return build_of(ROOT / "Pulumi.lab.yaml")


@pytest.fixture(scope="session")
def stack_files() -> list[Path]:
    return sorted(ROOT.glob("Pulumi.*.yaml"))
