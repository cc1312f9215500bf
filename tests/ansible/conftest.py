"""Fixtures for the Ansible tests: the sandboxed target, the agent wheel, and playbook runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_sandbox import ROOT, SandboxHost, Target, inventory_script, missing_prerequisites


@pytest.fixture(scope="session")
def sandbox_ready():
    why = missing_prerequisites()
    if why:
        pytest.skip(f"sandboxed Ansible target unavailable: {why}")


@pytest.fixture(scope="session")
def agent_wheel(tmp_path_factory) -> Path:
    """The aidc wheel built on the controller, as an offline site ships the agent."""
    from aidc.shipped import SHIPPED

    src = tmp_path_factory.mktemp("wheel-src")
    for name in ("pyproject.toml", "README.md", "setup.py", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "agents" / "aidc", src / "agents" / "aidc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # The project files setup.py puts into the wheel (runbooks, playbooks, ...): the controller's
    # runbook receiver reads its runbooks from there.
    for rel in SHIPPED:
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__", ".ansible"))
        else:
            shutil.copy(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("aidc-*.whl"))


@pytest.fixture(scope="session")
def agent_wheelhouse():
    """A wheel of every dependency in requirements-agent.lock, checked against its hashes, as an
    air-gapped site prepares it (pip reads its configured indexes and cache: no other network).
    Under /var/tmp, not /tmp: a sandbox sees this machine's files except /tmp (its own tmpfs), so
    the wheelhouse is on the target already, as on a site's shared filesystem."""
    out = Path(tempfile.mkdtemp(prefix="aidc-wheelhouse-", dir="/var/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--require-hashes", "--no-deps",
                        "--only-binary", ":all:", "--python-version", "3.11", "-r",
                        str(ROOT / "requirements-agent.lock"), "-d", str(out)], check=True, capture_output=True,
                       timeout=600)
        out.chmod(0o755)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def make_target(sandbox_ready):
    """Factory: make_target(stack, node, **extravars) -> Target; every sandbox is removed afterwards."""
    made: list[tuple[SandboxHost, str]] = []

    def make(stack: str | Path, node: str, **extravars) -> Target:
        base = Path(tempfile.mkdtemp(prefix="aidc-sandbox-"))
        sandbox = SandboxHost(base)
        made.append((sandbox, str(base)))
        sandbox.start()
        return Target(sandbox, inventory_script(base, stack), node, extravars)

    yield make
    for sandbox, base in made:
        sandbox.stop()
        shutil.rmtree(base, ignore_errors=True)
