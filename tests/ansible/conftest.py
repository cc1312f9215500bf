"""Fixtures for the Ansible tests: the sandboxed target, the agent wheel, and playbook runs."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aidc.ansible import PlaybookResult, run_playbook
from aidc.ansible.runner import SITE_PLAYBOOK
from sandbox import SandboxHost, missing_prerequisites

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
H100_STACK = HERE / "Pulumi.h100-fixture.yaml"
# The sandbox shares this machine's kernel and has no network: files only (see sandbox.py).
SANDBOX_VARS = {"aidc_manage_packages": False, "aidc_runtime_changes": False}


def inventory_script(directory: Path, stack: str | Path) -> Path:
    """A dynamic-inventory script running `python -m aidc inventory` on `stack`, as users do."""
    script = directory / "inventory.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m aidc inventory --stack {stack} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def fake_sysfs(root: Path, gpu_device_id: str = "0x2330", gpus: int = 8, nvswitches: int = 4,
               hcas: int = 8) -> Path:
    """A sysfs tree as an HGX H100 node shows it before any driver is installed."""
    pci = root / "bus" / "pci" / "devices"

    def device(addr: str, vendor: str, device_id: str, klass: str) -> None:
        d = pci / addr
        d.mkdir(parents=True)
        for name, value in (("vendor", vendor), ("device", device_id), ("class", klass)):
            (d / name).write_text(value + "\n")

    for i in range(gpus):
        device(f"0000:{0x18 + i * 0x10:02x}:00.0", "0x10de", gpu_device_id, "0x030200")
    for i in range(nvswitches):
        device(f"0000:{0x05 + i:02x}:00.0", "0x10de", "0x22a3", "0x068000")
    device("0000:00:1f.0", "0x8086", "0x1234", "0x060100")  # not NVIDIA: ignored
    for i in range(hcas):
        port = root / "class" / "infiniband" / f"mlx5_{i}" / "ports" / "1"
        port.mkdir(parents=True)
        (port / "link_layer").write_text("InfiniBand\n")
    return root


@pytest.fixture(scope="session")
def sandbox_ready():
    why = missing_prerequisites()
    if why:
        pytest.skip(f"sandboxed Ansible target unavailable: {why}")


@pytest.fixture(scope="session")
def agent_wheel(tmp_path_factory) -> Path:
    """The aidc wheel built on the controller, as an offline site ships the agent."""
    src = tmp_path_factory.mktemp("wheel-src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "agents" / "aidc", src / "agents" / "aidc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("aidc-*.whl"))


class Target:
    """One sandbox plus the inventory of a stack; `converge()` runs site.yml on one node through the wrapper."""

    def __init__(self, sandbox: SandboxHost, inventory: Path, node: str, extravars: dict):
        self.sandbox, self.inventory, self.node, self.extravars = sandbox, inventory, node, extravars

    def converge(self, check: bool = False, diff: bool = False, tags: tuple[str, ...] = (),
                 on_event=None, **extra) -> PlaybookResult:
        return run_playbook(SITE_PLAYBOOK, inventory=self.inventory, limit=self.node, check=check, diff=diff,
                            tags=tags, on_event=on_event, timeout_s=300,
                            extravars={**self.sandbox.connection_vars(), **SANDBOX_VARS, **self.extravars,
                                       **extra})


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
