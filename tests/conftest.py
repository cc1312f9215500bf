"""Shared test fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIDC_ROOT", str(ROOT))
# Tests written with the CLI's old spellings (aidc.cli.options.DEPRECATED) keep their exact-stderr
# assertions; tests/test_cli_surface.py checks the warnings themselves with this unset.
os.environ["AIDC_DEPRECATION_WARNINGS"] = "off"
# Subprocesses (`python -m aidc ...`) import this checkout's package, not another copy.
os.environ["PYTHONPATH"] = str(ROOT / "agents") + os.pathsep + os.environ.get("PYTHONPATH", "")


def pytest_configure(config):
    # Ansible's templating replaces sys.intern process-wide, and torch._dynamo, when first
    # imported, registers a stand-in for sys.intern and refuses the patched one. Import it first,
    # so that which test files a worker ran before torch's (pytest-xdist) does not matter.
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:  # no torch here: the tests that need it skip or fail on their own
        pass


@pytest.fixture
def aidc_cli():
    """Run the aidc CLI as a user would, in a subprocess; returns CompletedProcess."""
    import subprocess

    def run(*args: str, check: bool = False, timeout: float = 120, **kw):
        return subprocess.run([sys.executable, "-m", "aidc", *args], capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    return run


@pytest.fixture
def slurm_runnable():
    """Skips the test, with the reason, where a private Slurm cannot run: Slurm not installed
    (`make system-deps`) or not root."""
    from aidc.lab.slurm_cluster import missing_packages

    missing = missing_packages()
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}): run `make system-deps`")
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root (slurmd launches job steps as their user)")


@pytest.fixture
def local_slurm(tmp_path_factory, slurm_runnable):
    """A private, real Slurm (munged, slurmctld, 4 slurmd + 1 spare) for one test; skips when
    Slurm is not installed (`make system-deps`) or the test does not run as root."""
    from aidc.lab.slurm_cluster import LocalSlurm, SlurmNode

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"),
                         [SlurmNode(f"gpu-{i}", 2) for i in range(4)] + [SlurmNode("gpu-spare-0", 2)])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_dsn():
    """A private, real PostgreSQL for the whole session (Unix socket only, run as `postgres`),
    as a DSN; skips, with the reason, where PostgreSQL is not installed or the test is not root."""
    from aidc.lab.postgres_server import LocalPostgres, unavailable_reason
    from aidc.polling import free_port

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    import shutil
    import tempfile

    # Not tmp_path_factory: its root-owned 0700 parents keep the postgres user out.
    base = Path(tempfile.mkdtemp(prefix="aidc-postgres-"))
    server = LocalPostgres(base, port=free_port())
    try:
        server.start()
        yield server.dsn
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_dsn):
    """A fresh, empty database on the session's private PostgreSQL for one test (dropped after)."""
    import uuid

    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(postgres_dsn, dbname=name)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def state_location(request, tmp_path):
    """(backend name, location) of an empty state store, once per backend: the SQLite file or a
    fresh PostgreSQL database (skipped, with the reason, where PostgreSQL or psycopg is missing)."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "state.db")
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'aidc[postgres]'")
    return "postgres", request.getfixturevalue("postgres_database")


@pytest.fixture
def store_and_audit(tmp_path, state_location):
    """(event store, audit log): the store on each state backend (state_location), the log a file."""
    from aidc.audit import AuditLog
    from aidc.state import open_event_store

    store, audit = open_event_store(*state_location), AuditLog(tmp_path / "audit.db")
    yield store, audit
    store.close()
    audit.close()
