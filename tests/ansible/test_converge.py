"""site.yml converges on a sandboxed Debian host without GPUs, idempotently, through the wrapper.

Specification: the first converge configures what applies to a GPU-less host (NCCL config,
tuning files, the agent) and reports each skipped concern with its reason; a second converge
changes nothing (and a failure names the tasks that changed); `--check --diff` then reports no
change either. See ansible_sandbox.py for why the target is an overlay root in its own namespaces.
"""

from __future__ import annotations

import pytest
import yaml

from aidc.spec import load_stack
from ansible_sandbox import ROOT

pytestmark = pytest.mark.slow

LAB_STACK = ROOT / "Pulumi.lab.yaml"
REPORT_TASK = "Report what this host gets, and what is skipped and why"


@pytest.fixture(scope="module")
def lab_runs(make_target, agent_wheel):
    """Converge, converge again, then check+diff, all on node gpu-0 of the lab stack."""
    target = make_target(LAB_STACK, "gpu-0", aidc_agent_wheel=str(agent_wheel),
                         aidc_agent_pip_env={"PIP_NO_DEPS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    events: list[dict] = []
    first = target.converge(on_event=events.append)
    second = target.converge()
    check = target.converge(check=True, diff=True)
    return {"target": target, "first": first, "second": second, "check": check, "events": events}


def _report(events: list[dict]) -> dict:
    for event in events:
        data = event.get("event_data", {})
        if event.get("event") == "runner_on_ok" and data.get("task") == REPORT_TASK:
            return data["res"]["msg"]
    raise AssertionError("preflight printed no report")


def test_first_converge_succeeds_and_changes_the_files_that_apply_without_a_gpu(lab_runs):
    first = lab_runs["first"]
    assert first.ok, first.describe() + "\n" + first.stdout[-3000:]
    changed = {t.task for t in first.changed_tasks}
    assert "Render /etc/nccl.conf from the spec's fabric" in changed
    assert "Install the agent's systemd unit" in changed
    assert "Write the network, NUMA and hugepage sysctls" in changed


def test_gpu_only_concerns_are_skipped_and_the_report_says_why(lab_runs):
    first = lab_runs["first"]
    assert first.ok, first.describe()
    skipped = _report(lab_runs["events"])["skipped"]
    for concern in ("nvidia_driver", "cuda", "dcgm", "nouveau_blocklist"):
        assert "no NVIDIA GPU on the PCI bus" in skipped[concern]
    assert "NVSwitch" in skipped["fabric_manager"]
    assert "RDMA HCA" in skipped["rdma"]
    assert "lab, not slurm" in skipped["slurm_node"]
    assert "aidc_runtime_changes is false" in skipped["runtime changes"]
    skipped_roles = {t.role for t in first.skipped_tasks}
    assert {"nvidia_driver", "fabric_manager", "cuda", "rdma", "dcgm", "slurm_node"} <= skipped_roles
    # Nothing a GPU host gets was written here.
    target = lab_runs["target"]
    for path in ("/etc/modprobe.d/aidc-blocklist-nouveau.conf", "/etc/profile.d/aidc-cuda.sh",
                 "/etc/slurm/gres.conf", "/etc/modules-load.d/aidc-peermem.conf"):
        assert not target.sandbox.written(path).exists(), path


def test_second_converge_changes_nothing(lab_runs):
    second = lab_runs["second"]
    assert second.ok, second.describe()
    assert second.changed == 0, "not idempotent, changed on the second run:\n" + "\n".join(
        t.label() for t in second.changed_tasks)
    assert second.changed_tasks == []


def test_check_mode_with_diff_after_converge_reports_no_change(lab_runs):
    check = lab_runs["check"]
    assert check.ok, check.describe()
    assert check.changed == 0, "check mode would change:\n" + "\n".join(t.label() for t in check.changed_tasks)


def test_lab_nccl_conf_matches_the_lab_spec(lab_runs):
    spec = load_stack(LAB_STACK)
    text = lab_runs["target"].sandbox.written("/etc/nccl.conf").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert settings == {"NCCL_SOCKET_IFNAME": spec.fabric.socket_ifname, "NCCL_IB_DISABLE": "1"}
    assert all("=" not in line for line in text.splitlines() if line.startswith("#"))  # NCCL would parse it


def test_agent_gets_the_spec_its_identity_and_a_unit_with_kernel_log_access(lab_runs):
    target = lab_runs["target"]
    spec = load_stack(LAB_STACK)
    installed = load_stack(target.sandbox.written("/etc/aidc/stack.yaml"))
    assert installed == spec
    node = yaml.safe_load(target.sandbox.written("/etc/aidc/node.yaml").read_text())
    assert node == {"node": "gpu-0", "pool": "gpu", "spare": False, "gpu_model": "SIM", "gpus": 2,
                    "gpus_found": 0, "cluster": "lab"}
    unit = target.sandbox.written("/etc/systemd/system/aidc-agent.service").read_text()
    assert "AmbientCapabilities=CAP_SYSLOG" in unit and "SupplementaryGroups=adm" in unit
    assert "ExecStart=/opt/aidc/venv/bin/aidc " in unit
    exec_args = next(l for l in unit.splitlines() if l.startswith("ExecStart=")).split()[1:]
    assert exec_args[:3] == ["agent", "run", "--node"] and exec_args[3] == "gpu-0"
    import typer.main

    from aidc.cli.agent_cmd import app as agent_app

    command = typer.main.get_command(agent_app)
    run = command.commands["run"] if hasattr(command, "commands") else command
    known = {opt for p in run.params for opt in p.opts}
    assert {a for a in exec_args if a.startswith("--")} <= known
    site = target.sandbox.written("/opt/aidc/venv/lib/python3.11/site-packages")
    assert list(site.glob("aidc-0.1.0.dist-info")), "the agent wheel is not installed in the venv"
    passwd = target.sandbox.written("/etc/passwd").read_text()
    assert any(line.startswith("aidc:") for line in passwd.splitlines())


def test_every_role_that_runs_checks_its_arguments_first(lab_runs):
    """meta/argument_specs.yml is enforced, not documentation: Ansible validates each role's
    variables before the role's first task."""
    validated, ran = set(), set()
    for event in lab_runs["events"]:
        data = event.get("event_data", {})
        if event.get("event") != "runner_on_ok" or not data.get("role"):
            continue
        ran.add(data["role"])
        if data.get("task_action") in ("ansible.builtin.validate_argument_spec", "validate_argument_spec"):
            validated.add(data["role"])
    assert ran and validated == ran, sorted(ran - validated)
