"""Scheduler backends by name: the spec's `scheduler:` picks one, every caller opens it here.

`aidc failover` and `aidc runbook` (and the lab) call `open_scheduler`, so a new backend is
one entry in BACKENDS, not a change in each command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from aidc.errors import AidcError
from aidc.failover.scheduler import SchedulerBackend


class BackendUnavailable(AidcError):
    """The spec names a scheduler this build has no backend for."""


def _open_lab(spec, lab_dir: Path, audit, actor: str, tell_rendezvous: bool) -> SchedulerBackend:
    if tell_rendezvous:
        from aidc.lab.cluster import lab_scheduler

        import json

        # The job's members: its nodes, or with a rank per GPU their GPUs (lab.ranks, as the lab
        # recorded it: `aidc lab run --ranks` may override the stack's).
        try:
            ranks = json.loads((lab_dir / "lab.json").read_text()).get("ranks", spec.lab.ranks)
        except (OSError, ValueError):
            ranks = spec.lab.ranks
        primaries = spec.nodes(include_spares=False)
        members = sum(n.gpus for n in primaries) if ranks == "gpu" else len(primaries)
        return lab_scheduler(lab_dir, world_size=members)
    from aidc.failover.scheduler import LabScheduler

    return LabScheduler(lab_dir)


def _open_slurm(spec, lab_dir: Path, audit, actor: str, tell_rendezvous: bool) -> SchedulerBackend:
    from aidc.failover.slurm import SlurmScheduler

    if tell_rendezvous:
        # `aidc lab run --scheduler slurm`: the lab's private Slurm, and its rendezvous to tell.
        from aidc.lab.slurm_lab import lab_slurm_scheduler

        lab = lab_slurm_scheduler(lab_dir, spec, audit=audit, actor=actor)
        if lab is not None:
            return lab

    return SlurmScheduler.from_spec(spec, audit=audit, actor=actor)


def _open_kubernetes(spec, lab_dir: Path, audit, actor: str, tell_rendezvous: bool) -> SchedulerBackend:
    from aidc.failover.kubernetes import KubernetesScheduler, api_client_from

    return KubernetesScheduler(api_client_from(spec.kubernetes), spec.kubernetes,
                               count_down_nodes=spec.policy.count_down_nodes)


BACKENDS: dict[str, Callable[..., SchedulerBackend]] = {"lab": _open_lab, "slurm": _open_slurm,
                                                        "kubernetes": _open_kubernetes}


def check_backend(spec) -> None:
    """What a backend needs before anything is created (credentials): an error now, and no
    state directory, store or audit log left behind by a command that could not start."""
    if spec.scheduler == "kubernetes":
        from aidc.failover.kubernetes import api_client_from

        api_client_from(spec.kubernetes)


def open_scheduler(spec, lab_dir: str | Path = ".aidc/lab", audit=None, actor: str = "aidc",
                   tell_rendezvous: bool = True) -> SchedulerBackend:
    """The backend for `spec.scheduler`. `audit` (an AuditLog) records every change a backend makes
    to its scheduler (Slurm); `tell_rendezvous` (lab) evicts a quarantined node from the rendezvous."""
    opener = BACKENDS.get(spec.scheduler)
    if opener is None:
        raise BackendUnavailable(f"scheduler {spec.scheduler!r} has no backend in this build "
                                 f"(available: {', '.join(sorted(BACKENDS))})")
    return opener(spec, Path(lab_dir), audit, actor, tell_rendezvous)
