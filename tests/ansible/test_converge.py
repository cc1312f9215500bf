"""site.yml converges on a sandboxed Debian host without GPUs, idempotently, through the wrapper.

Specification: the first converge configures what applies to a GPU-less host (NCCL config,
tuning files, the agent) and reports each skipped concern with its reason; a second converge
changes nothing (and a failure names the tasks that changed); `--check --diff` then reports no
change either. See ansible_sandbox.py for why the target is an overlay root in its own namespaces.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from aidc.polling import stop_process_group
from aidc.spec import load_stack
from ansible_sandbox import ROOT, unit_service
from site_stack import CONTROLLER_ADDRESS, NODE_ADDRESSES, production_shaped_lab, scrape, site_pki

# Three converges, the first installing aidc and its dependencies for real: minutes on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

LAB_STACK = ROOT / "Pulumi.lab.yaml"
REPORT_TASK = "Report what this host gets, and what is skipped and why"


@pytest.fixture(scope="module")
def lab_runs(make_target, agent_wheel, agent_wheelhouse, tmp_path_factory):
    """Converge, converge again, then check+diff, all on node gpu-0 of the lab stack, installing
    from the wheelhouse only: no index, and none of this machine's pip configuration."""
    work = tmp_path_factory.mktemp("site")
    stack = production_shaped_lab(work)
    pki, scraper = site_pki(work)
    target = make_target(stack, "gpu-0", aidc_agent_wheel=str(agent_wheel),
                         aidc_agent_wheelhouse=str(agent_wheelhouse), aidc_agent_wheelhouse_on_host=True,
                         aidc_agent_pki_dir=str(pki),
                         aidc_agent_pip_env={"PIP_CONFIG_FILE": "/dev/null"})
    events: list[dict] = []
    # The first converge installs aidc and its dependencies: minutes on a loaded machine.
    first = target.converge(on_event=events.append, timeout_s=900)
    second = target.converge()
    check = target.converge(check=True, diff=True)
    return {"target": target, "stack": stack, "scraper": scraper, "first": first, "second": second,
            "check": check, "events": events}


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


def _unit(target) -> str:
    return target.sandbox.written("/etc/systemd/system/aidc-agent.service").read_text()


def test_agent_gets_the_spec_its_identity_and_a_unit_with_kernel_log_access(lab_runs):
    target = lab_runs["target"]
    spec = load_stack(lab_runs["stack"])
    installed = load_stack(target.sandbox.written("/etc/aidc/stack.yaml"))
    assert installed == spec
    node = yaml.safe_load(target.sandbox.written("/etc/aidc/node.yaml").read_text())
    assert node == {"node": "gpu-0", "pool": "gpu", "spare": False, "gpu_model": "SIM", "gpus": 2,
                    "gpus_found": 0, "cluster": "lab"}
    unit = _unit(target)
    assert "AmbientCapabilities=CAP_SYSLOG" in unit and "SupplementaryGroups=adm" in unit
    exec_args = unit_service(unit)["ExecStart"]
    assert exec_args[0] == "/opt/aidc/venv/bin/aidc"
    assert exec_args[1:4] == ["agent", "run", "--node"] and exec_args[4] == "gpu-0"
    import typer.main

    from aidc.cli.agent_cmd import app as agent_app

    command = typer.main.get_command(agent_app)
    run = command.commands["run"] if hasattr(command, "commands") else command
    known = {opt for p in run.params for opt in p.opts}
    assert {a for a in exec_args if a.startswith("--")} <= known
    passwd = target.sandbox.written("/etc/passwd").read_text()
    assert any(line.startswith("aidc:") for line in passwd.splitlines())


def test_the_unit_binds_the_management_address_and_reports_to_the_controller_over_mutual_tls(lab_runs):
    args = unit_service(_unit(lab_runs["target"]))["ExecStart"]
    flags = dict(zip(args[1::], args[2::]))
    assert flags["--listen-address"].rpartition(":")[0] == NODE_ADDRESSES[0]  # gpu-0's address in the spec's pool
    assert flags["--controller-url"] == f"https://{CONTROLLER_ADDRESS}:9443"  # the controller host's events port
    assert (flags["--tls-cert"], flags["--tls-key"], flags["--ca"]) == (
        "/etc/aidc/tls/node.crt", "/etc/aidc/tls/node.key", "/etc/aidc/tls/ca.crt")
    assert (flags["--metrics-tls-cert"], flags["--metrics-client-ca"]) == ("/etc/aidc/tls/node.crt",
                                                                          "/etc/aidc/tls/ca.crt")
    tls = lab_runs["target"].sandbox.written("/etc/aidc/tls")
    assert (tls / "node.key").stat().st_mode & 0o777 == 0o640  # the agent's group reads it, nobody else
    assert (tls / "node.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_the_agent_extra_is_installed_from_the_wheelhouse_with_every_dependency(lab_runs):
    target = lab_runs["target"]
    site = target.sandbox.written("/opt/aidc/venv/lib/python3.11/site-packages")
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"aidc", "prometheus_client", "nvidia_ml_py", "kubernetes", "python_pkcs11"} <= installed
    assert "torch" not in installed  # burn-in does not run on a lab-scheduler node
    # Made from the distribution's python3, which every user may run (not root's PATH's first).
    config = target.sandbox.written("/opt/aidc/venv/pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in config
    changed = {t.task for t in lab_runs["first"].changed_tasks}
    assert {"Install aidc's dependencies from the hashed lock",
            "Install aidc itself (its dependencies are the lock's)"} <= changed
    checked = [e for e in lab_runs["events"] if e.get("event") == "runner_on_ok"
               and e["event_data"].get("task") == "Check that every installed package has its dependencies"]
    assert checked and "No broken requirements found." in checked[0]["event_data"]["res"]["stdout"]


def test_the_rendered_unit_passes_systemd_analyze_verify(lab_runs):
    sandbox = lab_runs["target"].sandbox
    done = subprocess.run(sandbox.command(["systemd-analyze", "verify", "/etc/systemd/system/aidc-agent.service"]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aidc-agent.service" not in done.stderr, done.stderr  # no warning about the unit itself


def test_the_units_command_runs_as_its_user_and_is_scraped_from_another_host(lab_runs):
    """The unit's ExecStart, word for word, as its User in its WorkingDirectory with its
    Environment only (no PYTHONPATH: the code is the wheel's), scraped over mutual TLS from a
    second network namespace at the node's management address."""
    target = lab_runs["target"]
    service = unit_service(_unit(target))
    peer = target.sandbox.wire(NODE_ADDRESSES[0], CONTROLLER_ADDRESS)
    agent = subprocess.Popen(target.sandbox.command(service["ExecStart"], user=service["User"],
                                                    cwd=service["WorkingDirectory"], env=service["Environment"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        page = scrape(peer, f"https://{NODE_ADDRESSES[0]}:9402/metrics", lab_runs["scraper"], timeout_s=120,
                      alive=agent)
    finally:
        stop_process_group(agent)
        out, err = agent.communicate(timeout=30)
        print(err[-3000:])  # shown by pytest when the test fails
    assert 'aidc_agent_info{' in page and 'Hostname="gpu-0"' in page and 'backend="sim"' in page, err[-2000:]
    assert "aidc agent: watching gpu-0 (sim)" in err and f"https://{NODE_ADDRESSES[0]}:9402/metrics" in err


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
