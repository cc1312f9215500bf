"""The wheel, for real: built from a copy of the checkout as the Docker build context sees it,
and installed into a fresh virtualenv outside the repository, both by the Dockerfile's own
commands (`[agent]`, dependencies from requirements-agent.lock with hashes), then used as an operator would, with no
checkout in sight: no torch, and the runbooks, XID catalog, playbooks, example stacks and the
Grafana dashboard all found inside the installed package."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import aidc
from aidc.runbook.catalog import Catalog
from test_packaging import install_steps

ROOT = Path(__file__).resolve().parents[1]
# What pip prints when the index (or the network to it) cannot serve a dependency: then the
# test cannot say anything about the package and skips with pip's reason.
UNREACHABLE = re.compile(r"No matching distribution found|Could not find a version|Failed to establish|"
                         r"Temporary failure in name resolution|Network is unreachable|ConnectTimeout")
XID_79 = "[ 1234.567890] NVRM: Xid (PCI:0000:17:00): 79, pid=0, GPU has fallen off the bus.\n"

pytestmark = pytest.mark.slow


def build_context(dest: Path) -> Path:
    """The checkout less what .dockerignore leaves out (names and simple globs)."""
    patterns = [p.removeprefix("**/") for p in (ROOT / ".dockerignore").read_text().split()
                if not p.startswith("#")]
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*patterns), symlinks=True)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, clean environment, work dir outside the repository)."""
    base = tmp_path_factory.mktemp("wheel")
    src = build_context(base / "context")
    dist, venv = base / "dist", base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AIDC_ROOT", "AIDC_RUNBOOKS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # `pip` is the fresh venv's
    # The Dockerfile's own steps, with the image's paths replaced by this test's.
    for step in install_steps():
        command = (step.replace("/tmp/requirements-agent.lock", str(ROOT / "requirements-agent.lock"))
                   .replace("/dist", str(dist)))
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True,
                              timeout=540, env=env, cwd=src)
        if done.returncode != 0 and UNREACHABLE.search(done.stderr):
            pytest.skip(f"the package index cannot serve a dependency: {UNREACHABLE.search(done.stderr)[0]}")
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert sorted(p.name for p in dist.iterdir()) == [f"aidc-{aidc.__version__}-py3-none-any.whl", "requirement.txt"]
    work = base / "elsewhere"
    work.mkdir()
    return venv / "bin", env, work


def run(installed, *args: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
    bin_dir, env, work = installed
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=work, input=stdin)


def test_the_agent_install_has_no_torch_and_runs_aidc_from_site_packages(installed):
    probe = ("import importlib.util, json, aidc, aidc.shipped; "
             "print(json.dumps({'torch': importlib.util.find_spec('torch') is not None, 'aidc': aidc.__file__, "
             "'checkout': str(aidc.shipped.checkout_root())}))")
    found = json.loads(run(installed, "python", "-c", probe).stdout)
    assert found == {"torch": False, "aidc": found["aidc"], "checkout": "None"}
    assert "site-packages" in found["aidc"] and not found["aidc"].startswith(str(ROOT))
    version = run(installed, "aidc", "--version")
    assert (version.returncode, version.stdout) == (0, f"aidc {aidc.__version__}\n")


def test_runbook_list_reads_the_runbooks_the_wheel_carries(installed):
    result = run(installed, "aidc", "runbook", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert [rb["name"] for rb in json.loads(result.stdout)] == Catalog.load(ROOT / "runbooks").names()
    where = run(installed, "python", "-c", "from aidc.runbook.catalog import runbooks_dir, schema_path; "
                                           "print(runbooks_dir()); print(schema_path())")
    runbooks, schema = where.stdout.split()
    assert runbooks.endswith("site-packages/aidc/_project/runbooks") and Path(schema).is_file()
    inventory = Path(runbooks).parent / "playbooks" / "inventory" / "aidc_spec.sh"
    assert os.access(inventory, os.X_OK), "Ansible runs the inventory script: it must stay executable"


def test_health_parse_log_classifies_with_the_shipped_xid_catalog(installed):
    log = installed[2] / "kern.log"
    log.write_text(XID_79)
    result = run(installed, "aidc", "health", "parse-log", str(log), "--json")
    assert result.returncode == 0, result.stderr
    (event,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (event["xid"], event["action"]) == (79, "reboot_node")
    # `dmesg | aidc health parse-log -`: the same, from standard input.
    piped = run(installed, "aidc", "health", "parse-log", "-", "--json", stdin=XID_79)
    assert piped.returncode == 0, piped.stderr
    assert [json.loads(line)["xid"] for line in piped.stdout.splitlines()] == [79]


def test_the_example_stacks_ship_and_validate(installed):
    result = run(installed, "aidc", "spec", "check", "--stack", "h100-example", "--json")
    assert result.returncode == 0, result.stderr
    assert f"aidc-agent:{aidc.__version__}" in run(installed, "aidc", "spec", "show", "--stack", "h100-example",
                                                   "--json").stdout


def test_the_grafana_dashboard_ships_in_the_wheel_as_in_the_checkout(installed):
    where = run(installed, "python", "-c", "from aidc.shipped import project_file; "
                                           "print(project_file('dashboards/aidc.json'))")
    assert where.returncode == 0, where.stderr
    shipped = Path(where.stdout.strip())
    assert str(shipped).endswith("site-packages/aidc/_project/dashboards/aidc.json")
    assert shipped.read_bytes() == (ROOT / "dashboards" / "aidc.json").read_bytes()


def test_the_audit_report_renders_from_the_templates_the_wheel_carries(installed):
    work = installed[2]
    made = run(installed, "python", "-c", "from aidc.audit.log import AuditLog; "
               "AuditLog('audit.db').append('lab.start', 'lab from stack lab', actor='t', payload={'stack': 'lab'})")
    assert made.returncode == 0, made.stderr
    result = run(installed, "aidc", "audit", "report", "--db", "audit.db", "--out", "report", "--json")
    assert result.returncode == 0, result.stderr
    page = (work / "report" / "report.html").read_text()
    assert '<header id="verdict" class="verdict none">' in page and "stack <strong>lab</strong>" in page


def readline_within(stream, timeout_s: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        return stream.readline() if sel.select(timeout_s) else f"(nothing within {timeout_s} s)"


def test_the_agent_runs_on_the_sim_backend_and_stops_cleanly_on_sigterm(installed):
    bin_dir, env, work = installed
    node_dir = work / "gpu-0"
    made = run(installed, "python", "-c", f"from aidc.device.sim import create_node; create_node({str(node_dir)!r}, 'gpu-0', 2)")
    assert made.returncode == 0, made.stderr
    agent = subprocess.Popen([str(bin_dir / "aidc"), "agent", "run", "--node", "gpu-0", "--backend", "sim",
                              "--node-dir", str(node_dir), "--store", str(work / "events.db"),
                              "--audit-db", str(work / "audit.db"), "--port", "0", "--poll-interval", "0.1", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    try:
        announced = readline_within(agent.stderr, 60)  # printed once the watch loop is up
        assert announced.startswith("aidc agent: watching gpu-0 (sim)"), announced + agent.stderr.read()
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
    assert agent.returncode == 0, err
    summary = json.loads(out)
    assert summary["node"] == "gpu-0" and summary["backend"] == "sim"
