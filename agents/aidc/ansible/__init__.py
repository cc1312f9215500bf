"""Running aidc's playbooks from Python (tests now, the runbook engine later): see `runner`."""

from aidc.ansible.runner import HostCounts, PlaybookResult, TaskOutcome, run_playbook

__all__ = ["HostCounts", "PlaybookResult", "TaskOutcome", "run_playbook"]
