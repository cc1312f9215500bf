"""The aidc_controller role on a sandboxed controller host (site.yml's second play).

Specification: it installs aidc from the wheel and a wheelhouse (no index), the spec, the TLS
material and two systemd units that `systemd-analyze verify` accepts; a second converge and a
check-mode run change nothing; the units' command lines, started as written by the unit's user,
serve the agents' event listener, the controller's metrics and Alertmanager's webhook at the
host's management address, reached from another network namespace; the Alertmanager receiver
config passes `amtool check-config`; with state.backend postgres the DSN lands in the spec's
state.dsn_file, readable by the controller's user only.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from aidc.polling import stop_process_group
from ansible_sandbox import unit_service
from site_stack import CONTROLLER_ADDRESS, NODE_ADDRESSES, production_shaped_lab, scrape, site_pki

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

UNITS = ("aidc-failover.service", "aidc-runbook.service")


@pytest.fixture(scope="module")
def controller(make_target, agent_wheel, agent_wheelhouse, tmp_path_factory):
    work = tmp_path_factory.mktemp("site")
    pki, scraper = site_pki(work)
    # A Slurm site: the role's reason to exist (the lab scheduler's controller also needs torch,
    # for the lab's rendezvous, which the agent extra leaves out).
    target = make_target(production_shaped_lab(work, scheduler="slurm"), "ctl-0", aidc_agent_wheel=str(agent_wheel),
                         aidc_agent_wheelhouse=str(agent_wheelhouse), aidc_agent_wheelhouse_on_host=True,
                         aidc_agent_pki_dir=str(pki), aidc_agent_pip_env={"PIP_CONFIG_FILE": "/dev/null"})
    runs = [target.converge(timeout_s=900), target.converge(), target.converge(check=True, diff=True)]
    return {"target": target, "runs": runs, "pki": pki, "scraper": scraper}


def _service(target, unit: str) -> dict:
    return unit_service(target.sandbox.written(f"/etc/systemd/system/{unit}").read_text())


def test_the_controller_converges_idempotently_and_only_its_own_play_runs(controller):
    first, second, check = controller["runs"]
    assert first.ok, first.describe() + "\n" + first.stdout[-3000:]
    assert {t.role for t in first.changed_tasks} <= {"aidc_controller", "aidc_install"}
    assert second.ok and second.changed == 0, "\n".join(t.label() for t in second.changed_tasks)
    assert check.ok and check.changed == 0, "\n".join(t.label() for t in check.changed_tasks)
    target = controller["target"]
    assert not target.sandbox.written("/etc/systemd/system/aidc-agent.service").exists()  # no node roles


def test_the_units_name_the_state_directory_the_address_and_the_tls_material(controller):
    target = controller["target"]
    failover = _service(target, "aidc-failover.service")
    args = failover["ExecStart"]
    assert args[:3] == ["/opt/aidc/venv/bin/aidc", "failover", "run"]
    flags = dict(zip(args[3::], args[4::]))
    assert flags["--state-dir"] == "/var/lib/aidc-controller" == failover["WorkingDirectory"]
    assert flags["--ingest-address"] == f"{CONTROLLER_ADDRESS}:9443"
    assert flags["--listen-address"].rpartition(":")[0] == CONTROLLER_ADDRESS
    assert flags["--client-ca"] == "/etc/aidc/tls/ca.crt" and flags["--stack"] == "/etc/aidc/stack.yaml"
    runbook = _service(target, "aidc-runbook.service")["ExecStart"]
    flags = dict(zip(runbook[3::], runbook[4::]))
    assert runbook[1:3] == ["runbook", "serve"] and flags["--listen-address"].rpartition(":")[0] == CONTROLLER_ADDRESS
    assert flags["--audit-db"] == "/var/lib/aidc-controller/audit.db"  # one audit log for both services
    assert failover["User"] == "aidc-controller"
    key = target.sandbox.written("/etc/aidc/tls/controller.key")
    assert key.stat().st_mode & 0o777 == 0o640


def test_systemd_analyze_verify_accepts_both_units(controller):
    sandbox = controller["target"].sandbox
    done = subprocess.run(sandbox.command(["systemd-analyze", "verify", *(f"/etc/systemd/system/{u}" for u in UNITS)]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any(u in done.stderr for u in UNITS), done.stderr


def test_the_alertmanager_receiver_config_passes_amtool_and_points_at_the_receiver(controller):
    sandbox = controller["target"].sandbox
    done = subprocess.run(sandbox.command(["amtool", "check-config", "/etc/aidc/alertmanager-aidc-receiver.yml"]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = sandbox.written("/etc/aidc/alertmanager-aidc-receiver.yml").read_text()
    assert json.dumps(f"https://{CONTROLLER_ADDRESS}:9097/alerts") in text
    assert sandbox.written("/etc/aidc/tls/alertmanager/alertmanager.key").exists()


def test_both_units_commands_serve_at_the_management_address_from_another_host(controller):
    target = controller["target"]
    peer = target.sandbox.wire(CONTROLLER_ADDRESS, NODE_ADDRESSES[0])
    procs = []
    try:
        for unit in UNITS:
            service = _service(target, unit)
            procs.append(subprocess.Popen(
                target.sandbox.command(service["ExecStart"], user=service["User"], cwd=service["WorkingDirectory"],
                                       env=service["Environment"]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
        metrics = scrape(peer, f"http://{CONTROLLER_ADDRESS}:9403/metrics", controller["scraper"], timeout_s=90)
        receiver = scrape(peer, f"https://{CONTROLLER_ADDRESS}:9097/healthz", controller["scraper"], timeout_s=90,
                          alive=procs[1])
        events = scrape(peer, f"https://{CONTROLLER_ADDRESS}:9443/healthz", controller["scraper"], timeout_s=30,
                        any_status=True)
    finally:
        errors = []
        for proc in procs:
            stop_process_group(proc)
            errors.append(proc.communicate(timeout=30)[1][-1500:])
        print("\n".join(errors))  # shown by pytest when the test fails
    assert "aidc_failover_lease_held" in metrics, errors
    assert receiver.strip(), errors
    assert json.loads(events) == {"ok": True}, (events, errors)  # the agents' listener, over mutual TLS


def test_a_postgres_dsn_goes_to_the_dsn_file_for_the_controllers_user_only(controller):
    target = controller["target"]
    dsn = "host=db.example dbname=aidc user=aidc password=not-in-the-stack"
    state = {"backend": "postgres", "dsn": None, "dsn_file": "/etc/aidc/state.dsn", "dsn_env": None}
    result = target.converge(tags=("aidc_controller_state",), aidc_state=state, aidc_controller_state_dsn=dsn)
    assert result.ok, result.describe()
    written = target.sandbox.written("/etc/aidc/state.dsn")
    assert written.read_text() == dsn + "\n"
    assert written.stat().st_mode & 0o777 == 0o600
    passwd = target.sandbox.written("/etc/passwd").read_text().splitlines()
    uid = next(int(line.split(":")[2]) for line in passwd if line.startswith("aidc-controller:"))
    assert written.stat().st_uid == uid
    assert "not-in-the-stack" not in result.stdout  # no_log: the secret is not in Ansible's output
