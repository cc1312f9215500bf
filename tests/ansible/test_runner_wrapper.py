"""aidc.ansible.run_playbook: events streamed, per-host counts, changed/failed tasks named,
nothing carried over between runs. Drives a small playbook on localhost that writes only into
the test's temporary directory."""

from __future__ import annotations

import sys

import pytest

from aidc.ansible import run_playbook
from aidc.ansible.runner import AnsibleRunError

pytestmark = pytest.mark.slow

PLAYBOOK = """
- name: Write a value
  hosts: all
  gather_facts: false
  tasks:
    - name: Write the value file
      ansible.builtin.copy:
        dest: "{{ out }}/value"
        content: "{{ value | default('unset') }}\\n"
        mode: "0644"
    - name: Fail when asked to
      ansible.builtin.fail:
        msg: "asked to fail ({{ out | basename }})"
      when: fail_now | default(false)
"""


@pytest.fixture
def local(tmp_path):
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    inventory = {"all": {"hosts": {"here": {"ansible_connection": "local",
                                            "ansible_python_interpreter": sys.executable,
                                            "out": str(tmp_path)}}}}
    return playbook, inventory, tmp_path


def test_changes_are_counted_and_named_and_a_rerun_changes_nothing(local):
    playbook, inventory, out = local
    events: list[dict] = []
    first = run_playbook(playbook, inventory=inventory, extravars={"value": "a"}, on_event=events.append)
    assert first.ok, first.describe()
    assert first.hosts["here"].changed == 1 and first.hosts["here"].skipped == 1
    assert [(t.host, t.task) for t in first.changed_tasks] == [("here", "Write the value file")]
    assert [(t.host, t.task) for t in first.skipped_tasks] == [("here", "Fail when asked to")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "playbook_on_start" and "runner_on_ok" in kinds and kinds[-1] == "playbook_on_stats"
    assert (out / "value").read_text() == "a\n"

    second = run_playbook(playbook, inventory=inventory, extravars={"value": "a"})
    assert second.ok and second.changed == 0 and second.changed_tasks == []

    # Extra vars are never saved for later runs (ansible-runner would reuse env/extravars), and a
    # run that is not idempotent names the task that changed.
    third = run_playbook(playbook, inventory=inventory)
    assert third.ok and (out / "value").read_text() == "unset\n"
    assert [t.label() for t in third.changed_tasks] == ["here: Write the value file"]


def test_a_failing_task_is_named_with_its_message_and_the_run_is_not_ok(local):
    playbook, inventory, out = local
    result = run_playbook(playbook, inventory=inventory, extravars={"fail_now": True})
    assert not result.ok and result.status == "failed"
    [failure] = result.failed_tasks
    assert failure.task == "Fail when asked to" and f"asked to fail ({out.name})" in failure.detail
    assert result.hosts["here"].failed == 1


def test_a_run_that_reaches_no_host_is_not_ok_although_ansible_exits_0(local):
    playbook, _, _ = local
    result = run_playbook(playbook, inventory={"all": {"hosts": {}}})
    assert result.rc == 0 and result.hosts == {} and not result.ok


def test_a_missing_playbook_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(AnsibleRunError, match="no such playbook"):
        run_playbook(tmp_path / "absent.yml", inventory={"all": {"hosts": {}}})


def test_a_rescued_failure_is_ok_and_an_ignored_failure_that_changed_is_listed(tmp_path):
    playbook = tmp_path / "rescue.yml"
    playbook.write_text("""
- hosts: all
  gather_facts: false
  tasks:
    - name: ignored failure
      ansible.builtin.command: "false"
      ignore_errors: true
    - block:
        - name: fails then rescued
          ansible.builtin.command: "false"
      rescue:
        - name: rescue task
          ansible.builtin.debug: msg=rescued
""")
    inventory = {"all": {"hosts": {"here": {"ansible_connection": "local",
                                            "ansible_python_interpreter": sys.executable}}}}
    result = run_playbook(playbook, inventory=inventory)
    assert result.ok and result.failed_tasks == [], result.describe()
    # The recap counts the ignored failure as changed (a command always reports changed).
    assert [t.task for t in result.changed_tasks] == ["ignored failure"]
    assert result.hosts["here"].changed == 1
