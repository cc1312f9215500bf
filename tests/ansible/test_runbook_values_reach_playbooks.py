"""Values from an alert (or a person's --label) reach remediation playbooks only as validated,
never-templated data, and program arguments are argv lists.

Each test runs the real remediation playbook through the real ansible-runner facade (the
engine's AnsiblePlaybookRunner where the path starts at an alert) against localhost. The
programs a remediation drives (nvidia-smi, ip) do not exist or must not act here: a recording
stand-in on PATH writes the argv it received, one bracketed argument after another, which is
exactly what the test needs to see. sysfs is the test's own tree (`sysfs_root`).
"""

from __future__ import annotations

import os
import stat
import time
import sys
from pathlib import Path

import pytest

from aidc.ansible import run_playbook
from aidc.audit.log import AuditLog
from aidc.runbook.actuators import Actuators, AnsiblePlaybookRunner
from aidc.runbook.catalog import Catalog
from aidc.runbook.engine import Engine
from aidc.runbook.state import RunState
from aidc.runbook.steps import step_params
from aidc.spec import Policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runbook"))
from runbook_fakes import FakeBurnin, FakeMetrics, FakeNotifier, FakeScheduler, alert  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
NODE = "gpu-0"


def _recording_program(bin_dir: Path, name: str, log: Path) -> None:
    """A stand-in for `name` that appends its argv to `log` as `[arg][arg]...` lines."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text("#!/bin/sh\n"
                      f"for a in \"$@\"; do printf '[%s]' \"$a\"; done >> '{log}'\n"
                      f"echo >> '{log}'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def localhost(tmp_path, monkeypatch):
    """An inventory of one host named like a lab node, reached by the local connection, no sudo."""
    monkeypatch.setenv("ANSIBLE_HOME", str(tmp_path / "ansible-home"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return {"all": {"hosts": {NODE: {"ansible_connection": "local", "ansible_become": False,
                                     "ansible_python_interpreter": sys.executable}}}}


def _engine(tmp_path, inventory) -> Engine:
    actuators = Actuators(scheduler=FakeScheduler(), metrics=FakeMetrics(),
                          playbooks=AnsiblePlaybookRunner(PLAYBOOKS, inventory), burnin=FakeBurnin(),
                          notifier=FakeNotifier())
    return Engine(catalog=Catalog.load(ROOT / "runbooks"), state=RunState(tmp_path / "state.db"),
                  audit=AuditLog(tmp_path / "audit.db"), actuators=actuators, nodes=[NODE, "gpu-1"],
                  policy=Policy())


def _drive(engine: Engine, run_id: int):
    """Run until done, approving every approve step as a person would."""
    for _ in range(5):
        run = engine.execute(run_id)
        if run.status != "awaiting_approval":
            return run
        engine.approve(run_id, "alice")
    raise AssertionError("run kept waiting for approval")


@pytest.mark.parametrize("label", [
    "0 {{ lookup('pipe', 'echo PWNED > %(pwned)s') }}",
    "{{ lookup('pipe', 'echo PWNED > %(pwned)s') }}",
    "0 --other-flag",
    "0; echo PWNED > %(pwned)s",
])
def test_a_gpu_label_that_is_not_a_gpu_index_fails_the_run_before_any_step(tmp_path, localhost, label):
    pwned = tmp_path / "pwned"
    calls = tmp_path / "nvidia-smi.calls"
    _recording_program(tmp_path / "bin", "nvidia-smi", calls)
    engine = _engine(tmp_path, localhost)
    try:
        sub = engine.submit_alert(alert("AidcGpuDoubleBitEcc", NODE, gpu=label % {"pwned": pwned}))
        assert sub.outcome == "started", sub
        run = _drive(engine, sub.run_id)
        assert not pwned.exists(), "a template in an alert label was executed"
        assert _calls(calls) == [], "nvidia-smi ran although the gpu label is not a GPU index"
        assert run.status == "failed" and "gpu" in run.error
        assert [s.status for s in engine.state.steps(sub.run_id)] == ["pending"] * len(engine.state.steps(sub.run_id))
        assert engine.actuators.scheduler.calls == []
        [rejected] = engine.audit.records(kind="runbook.params.rejected")
        assert rejected.payload["run_id"] == sub.run_id and "gpu" in rejected.payload["error"]
        assert [r.payload["status"] for r in engine.audit.records(kind="runbook.run.finished")] == ["failed"]
    finally:
        engine.audit.close()
        engine.state.close()


def test_a_valid_gpu_label_resets_exactly_that_gpu_with_an_argv_list(tmp_path, localhost):
    calls = tmp_path / "nvidia-smi.calls"
    _recording_program(tmp_path / "bin", "nvidia-smi", calls)
    engine = _engine(tmp_path, localhost)
    try:
        sub = engine.submit_alert(alert("AidcGpuDoubleBitEcc", NODE, gpu="3"))
        _drive(engine, sub.run_id)
        reset = next(s for s in engine.state.steps(sub.run_id) if s.step_id == "reset-gpu")
        assert reset.status == "done", reset.result
        assert "[--gpu-reset][-i][3]" in _calls(calls)
    finally:
        engine.audit.close()
        engine.state.close()


def test_extravars_reach_the_playbook_as_text_never_as_a_template(tmp_path, localhost):
    """The facade's own guarantee, whatever its caller validated: a string is never templated."""
    pwned = tmp_path / "pwned"
    playbook = tmp_path / "echo.yml"
    playbook.write_text(f"""
- name: Echo a value
  hosts: all
  gather_facts: false
  tasks:
    - name: Write the value
      ansible.builtin.copy:
        dest: "{tmp_path}/value"
        content: "{{{{ value }}}}"
        mode: "0644"
    - name: Pass the value as one program argument
      ansible.builtin.command:
        argv: [/bin/sh, -c, 'printf "%s|" "$@" > {tmp_path}/argv', sh, "{{{{ value }}}}"]
      changed_when: false
""")
    value = f"0 --other-flag {{{{ lookup('pipe', 'echo PWNED > {pwned}') }}}}"
    nested = {"items": [value], "n": 3}
    result = run_playbook(playbook, inventory=localhost, extravars={"value": value, "nested": nested},
                          limit=NODE, timeout_s=240)
    assert result.ok, result.describe() + result.stdout[-2000:]
    assert not pwned.exists()
    assert (tmp_path / "value").read_text() == value
    assert (tmp_path / "argv").read_text() == value + "|"


def test_gpu_reset_refuses_a_gpu_that_is_not_an_index_even_when_called_directly(tmp_path, localhost):
    calls = tmp_path / "nvidia-smi.calls"
    _recording_program(tmp_path / "bin", "nvidia-smi", calls)
    result = run_playbook(PLAYBOOKS / "gpu-reset.yml", inventory=localhost, extravars={"gpu": "0 --other-flag"},
                          limit=NODE, timeout_s=240)
    # The playbook's own argument check refuses a GPU that is not an index: nothing is reset.
    assert not result.ok
    assert not any("--gpu-reset" in c for c in _calls(calls))
    assert not any("[--other-flag]" in c for c in _calls(calls))


def test_gpu_reset_of_all_gpus_names_no_index(tmp_path, localhost):
    calls = tmp_path / "nvidia-smi.calls"
    _recording_program(tmp_path / "bin", "nvidia-smi", calls)
    result = run_playbook(PLAYBOOKS / "gpu-reset.yml", inventory=localhost, extravars={"all_gpus": True},
                          limit=NODE, timeout_s=240)
    assert result.ok, result.describe()
    assert "[--gpu-reset]" in _calls(calls)


def test_ib_port_reset_bounces_the_interface_of_the_alerts_device_and_port(tmp_path, localhost):
    """infiniband-link's alert names an HCA and port (mlx5_1, 1); the playbook finds its interface."""
    sysfs = tmp_path / "sys"
    for dev, netdevs in (("mlx5_0", {"ib0": 0}), ("mlx5_1", {"ib1": 0, "ib2": 1})):
        for name, dev_port in netdevs.items():
            d = sysfs / "class" / "infiniband" / dev / "device" / "net" / name
            d.mkdir(parents=True)
            (d / "dev_port").write_text(f"{dev_port}\n")
            (sysfs / "class" / "net" / name).mkdir(parents=True)
            (sysfs / "class" / "net" / name / "operstate").write_text("up\n")
    calls = tmp_path / "ip.calls"
    _recording_program(tmp_path / "bin", "ip", calls)
    # The variables exactly as the runbook's reset step passes them, after validation.
    [step] = [s for s in Catalog.load(ROOT / "runbooks").get("infiniband-link").steps if s.kind == "playbook"]
    extravars = step_params(step, {"node": NODE, "device": "mlx5_1", "port": 2})["extravars"]
    result = run_playbook(PLAYBOOKS / step.raw["playbook"], inventory=localhost,
                          extravars={**extravars, "sysfs_root": str(sysfs)}, limit=NODE, timeout_s=240)
    assert result.ok, result.describe() + result.stdout[-2000:]
    assert _calls(calls) == ["[link][set][dev][ib2][down]", "[link][set][dev][ib2][up]"]


def test_checkpoint_prune_removes_files_under_the_path_the_approver_saw(tmp_path, localhost):
    """checkpoint-disk-full's prompt names ${path}; the playbook must prune that directory."""
    volume = tmp_path / "ckpt"
    volume.mkdir()
    for i in range(5):
        f = volume / f"step-{i}.pt"
        f.write_text(str(i))
        os.utime(f, (time.time() - 100 + i,) * 2)
    rb = Catalog.load(ROOT / "runbooks").get("checkpoint-disk-full")
    [step] = [s for s in rb.steps if s.kind == "playbook"]
    approve = next(s for s in rb.steps if s.kind == "approve")
    variables = {"node": NODE, "path": str(volume)}
    assert str(volume) in step_params(approve, variables)["prompt"]
    extravars = step_params(step, variables)["extravars"]
    result = run_playbook(PLAYBOOKS / step.raw["playbook"], inventory=localhost, extravars=extravars,
                          limit=NODE, timeout_s=240)
    assert result.ok, result.describe() + result.stdout[-2000:]
    assert sorted(p.name for p in volume.iterdir()) == ["step-2.pt", "step-3.pt", "step-4.pt"]
