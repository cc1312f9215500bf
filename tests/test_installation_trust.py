"""Trust comes from the installation, not the caller.

Specification: the roles and policy of privileged commands (`aidc runbook approve`, `aidc
failover release`, `aidc failover breaker reset`, a live `aidc runbook run`) are those the
state directory's installer recorded (`installation.json`, aidc.installation). A viewer, a
real unprivileged user, who names a stack file of their own that makes them approver is
refused (exit 3, one line, audited `access.refused`) and nothing changes; so is anyone when
the record is missing or others could have changed it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from aidc.audit.log import AuditLog
from aidc.device.sim import create_node
from aidc.failover.remediation import RemediationGate
from aidc.failover.scheduler import LabScheduler
from aidc.identity import cli_identity
from aidc.installation import RECORD_NAME, InstallationError, load, record
from aidc.runbook.state import RunState
from aidc.spec import load_stack
from aidc.store import Store
from tests.runbook.runbook_fakes import APPROVE_THEN_QUARANTINE

ROOT = Path(__file__).resolve().parents[1]
VIEWER_UID = 65534  # nobody
VIEWER = "user:nobody"
ME = cli_identity()
NODES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3", "gpu-spare-0"]


def write_stack(path: Path, roles: dict) -> Path:
    doc = yaml.safe_load((ROOT / "Pulumi.lab.yaml").read_text())
    cluster = doc["config"]["aidc:cluster"]
    cluster["access"] = {"roles": roles}
    cluster["policy"]["runbook_auto_approve"] = []  # a quarantine waits for a person
    cluster["policy"]["breaker"] = {"max_quarantines": 1}
    path.write_text(yaml.safe_dump(doc))
    os.chmod(path, 0o644)
    return path


def as_viewer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m aidc ...` as the unprivileged viewer. It keeps only the right to read and
    search files (the venv's interpreter lives under /root), not to write what it does not own."""
    return subprocess.run(["setpriv", f"--reuid={VIEWER_UID}", f"--regid={VIEWER_UID}", "--clear-groups",
                           "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search",
                           sys.executable, "-m", "aidc", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "HOME": str(cwd)})


@pytest.fixture
def site(aidc_cli):
    """A lab state directory installed by root with roles {root: approver, nobody: viewer}: a
    run waiting for approval, gpu-1 quarantined, the breaker open. The state is the viewer's to
    write (their files in world-writable, sticky directories); the installation record stays
    root's, and the sticky bit keeps others from replacing it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another, unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="aidc-trust-"))
    os.chmod(base, 0o755)
    lab = base / "lab"
    for i, name in enumerate(NODES):
        create_node(lab / "nodes" / name, name, 2, i)
    (base / "rb").mkdir()
    (base / "rb" / "ask-then-drain.yaml").write_text(APPROVE_THEN_QUARANTINE)
    installed = write_stack(base / "Pulumi.site.yaml", {ME: "approver", VIEWER: "viewer"})
    common = ("--stack", str(installed), "--lab-dir", str(lab))
    runbook = ("--runbooks", str(base / "rb"), "--state-db", str(lab / "runs.db"), "--audit-db", str(lab / "audit.db"))
    done = aidc_cli("failover", "install", *common)
    assert done.returncode == 0, done.stderr
    started = aidc_cli("runbook", "run", "ask-then-drain", "--node", "gpu-2", "--json", *common, *runbook)
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["status"] == "awaiting_approval"
    LabScheduler(lab).quarantine("gpu-1", "XID 79")
    spec = load_stack(str(installed))
    store, audit = Store(lab / "state.db"), AuditLog(lab / "audit.db")
    store.set_node_state("gpu-1", "quarantined", "XID 79", "failover")
    gate = RemediationGate(spec, store, audit)
    with store.transaction():
        gate.record("gpu-0", "reboot_node", "failover", "event 1")
    assert gate.admit("gpu-3", ref="event 2") and gate.breaker()["open"]  # admit names why not
    store.close()
    audit.close()
    for directory, dirs, files in os.walk(base):
        os.chmod(directory, 0o1777)
        for name in files:
            os.chown(Path(directory) / name, VIEWER_UID, VIEWER_UID)
    os.chown(lab / RECORD_NAME, 0, 0)
    yield {"base": base, "lab": lab, "common": common, "runbook": runbook, "run_id": json.loads(started.stdout)["id"]}
    shutil.rmtree(base)


COMMANDS = {
    "runbook approve": lambda s, stack: ("runbook", "approve", str(s["run_id"]), "--stack", stack,
                                         "--lab-dir", str(s["lab"]), *s["runbook"]),
    "failover release": lambda s, stack: ("failover", "release", "gpu-1", "--reason", "mine now", "--stack", stack,
                                          "--lab-dir", str(s["lab"])),
    "breaker reset": lambda s, stack: ("failover", "breaker", "reset", "--reason", "mine now", "--stack", stack,
                                       "--lab-dir", str(s["lab"])),
    "runbook run": lambda s, stack: ("runbook", "run", "ask-then-drain", "--node", "gpu-0", "--stack", stack,
                                     "--lab-dir", str(s["lab"]), *s["runbook"]),
}


def unchanged(site) -> dict:
    """What each command would change, as it stands."""
    lab = site["lab"]
    runs = RunState(lab / "runs.db")
    store = Store(lab / "state.db")
    try:
        return {"run": runs.get_run(site["run_id"]).status, "runs": len(runs.runs()),
                "gpu-1": LabScheduler(lab).state("gpu-1"), "breaker_open": bool(RemediationGate(
                    load_stack(site["common"][1]), store, None).breaker().get("open"))}
    finally:
        store.close()


def refusals(lab: Path) -> list:
    with AuditLog(lab / "audit.db", read_only=True) as log:
        return [(r.actor, r.payload.get("problem")) for r in log.records(kind="access.refused")]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_viewer_with_a_stack_file_of_their_own_making_them_approver_is_refused(site, command):
    mine = site["base"] / "mine"
    mine.mkdir()
    own = write_stack(mine / "Pulumi.mine.yaml", {VIEWER: "approver"})
    before = unchanged(site)
    out = as_viewer(*COMMANDS[command](site, str(own)), cwd=mine)
    assert out.returncode == 3, out.stdout + out.stderr
    assert out.stderr.startswith(f"aidc: error: {VIEWER} may not ") and out.stderr.count("\n") == 1, out.stderr
    assert "disagrees with the installation" in out.stderr and "access.roles" in out.stderr
    assert unchanged(site) == before
    [(actor, problem)] = refusals(site["lab"])
    assert actor == VIEWER and "access.roles" in problem


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_with_the_installed_stack_the_viewer_has_the_installed_role_only(site, command):
    before = unchanged(site)
    out = as_viewer(*COMMANDS[command](site, site["common"][1]), cwd=site["base"])
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"{VIEWER} (role viewer) may not" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert unchanged(site) == before


def test_the_installer_acts_with_the_installed_stack(site, aidc_cli):
    out = aidc_cli(*COMMANDS["failover release"](site, site["common"][1]))
    assert out.returncode == 0, out.stderr
    assert LabScheduler(site["lab"]).state("gpu-1") == "in_service"


@pytest.mark.parametrize("damage", ["missing", "writable by others", "directory writable without sticky bit",
                                    "owned by another user", "a symlink"])
def test_a_missing_or_unsafe_record_refuses_even_the_installer(site, aidc_cli, damage):
    lab, path = site["lab"], site["lab"] / RECORD_NAME
    if damage == "missing":
        path.unlink()
    elif damage == "writable by others":
        os.chmod(path, 0o666)
    elif damage == "directory writable without sticky bit":
        os.chmod(lab, 0o777)
    elif damage == "owned by another user":
        os.chown(path, VIEWER_UID, VIEWER_UID)
    else:
        path.rename(site["base"] / "elsewhere.json")
        path.symlink_to(site["base"] / "elsewhere.json")
    before = unchanged(site)
    out = aidc_cli(*COMMANDS["failover release"](site, site["common"][1]))
    assert out.returncode == 3 and out.stderr.count("\n") == 1, out.stderr
    assert ("no installation record" if damage == "missing" else "is not trusted") in out.stderr
    assert unchanged(site) == before
    [(actor, _)] = refusals(lab)
    assert actor == ME


def test_the_viewer_cannot_replace_the_record(site):
    forged = site["base"] / "forged.json"
    forged.write_text((site["lab"] / RECORD_NAME).read_text().replace('"viewer"', '"approver"'))
    os.chmod(forged, 0o644)
    out = subprocess.run(["setpriv", f"--reuid={VIEWER_UID}", f"--regid={VIEWER_UID}", "--clear-groups",
                          "mv", "-f", str(forged), str(site["lab"] / RECORD_NAME)], capture_output=True, text=True)
    assert out.returncode != 0
    assert load(site["lab"]).roles[VIEWER] == "viewer"


def test_a_record_keeps_its_signing_key_when_roles_are_installed_again(tmp_path):
    spec = load_stack("lab")
    record(tmp_path, spec, "lab", public_key_pem="PEM", key_id="k")
    record(tmp_path, spec, "lab")
    assert (load(tmp_path).public_key_pem, load(tmp_path).key_id) == ("PEM", "k")
    (tmp_path / RECORD_NAME).write_text('{"format": "something else"}')
    with pytest.raises(InstallationError, match="not one aidc writes"):
        load(tmp_path)
