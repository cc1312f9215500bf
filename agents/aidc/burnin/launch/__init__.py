"""How the node program reaches the nodes: one burn-in path, a launcher per scheduler.

`aidc burnin run` picks the launcher by the stack's scheduler name (`lab`, `slurm`, `kubernetes`:
one Job per node). Every launcher runs the same node program
(`aidc.burnin.worker`) with the stack's device backend on each node, over a rendezvous store the
run owns, and hands back each node's raw results as JSON; judging, signing and the audit record
happen where the command runs (`aidc.burnin.runner`), whoever launched the nodes.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from aidc.burnin.report import BurninReport
from aidc.errors import BurninError

# Scheduler name -> module holding its `LAUNCHER`; imported only when used (they pull in torch).
_LAUNCHERS = {"lab": "aidc.burnin.launch.lab", "slurm": "aidc.burnin.launch.slurm",
              "kubernetes": "aidc.burnin.launch.kubernetes"}


@dataclass
class LaunchResult:
    report: BurninReport
    job_id: str | None = None  # the scheduler's job, where it gives one


class Launcher(Protocol):
    name: str

    def run(self, spec, nodes: list, *, lab_dir: Path, audit, progress: bool, timeout_s: float,
            say: Callable[[str], None], known_answers: dict[str, dict[str, str]] | None = None,
            soak_s: float = 0.0, tests: list[str] | tuple[str, ...] | None = None) -> LaunchResult:
        """Burn in `nodes` (spec.Node, in spec order), judge them (`known_answers`, `soak_s`,
        `tests`: as aidc.burnin.runner.run_burnin), certify them to `audit`. Raises BurninError when
        the run cannot complete."""


def registered_launchers() -> list[str]:
    return list(_LAUNCHERS)


def launcher_for(scheduler: str) -> Launcher:
    module = _LAUNCHERS.get(scheduler)
    if module is None:
        raise BurninError(f"no burn-in launcher for scheduler {scheduler!r} (there are: {', '.join(_LAUNCHERS)})")
    return importlib.import_module(module).LAUNCHER


def resolve_stack(spec, scheduler: str | None, lab_dir: Path):
    """The stack as this run schedules it. `--scheduler slurm` on the lab stack: the lab's kept
    private Slurm (`aidc lab run --scheduler slurm --keep --lab-dir L`), read from L's lab.json."""
    if scheduler is None or scheduler == spec.scheduler:
        return spec
    if spec.scheduler == "lab" and scheduler == "slurm":
        try:
            conf = (json.loads((Path(lab_dir) / "lab.json").read_text()).get("slurm") or {}).get("conf")
        except (OSError, ValueError, AttributeError):
            conf = None
        if not conf:
            raise BurninError(f"no kept Slurm lab in {lab_dir} (start one with `aidc lab run --scheduler slurm"
                              f" --keep --lab-dir {lab_dir}`)")
        return spec.model_copy(update={"scheduler": "slurm", "slurm": spec.slurm.model_copy(update={"conf": conf})})
    raise BurninError(f"stack {spec.name!r} is scheduled by {spec.scheduler}; --scheduler {scheduler} applies only"
                      " to the lab stack on its kept Slurm (--scheduler slurm)")


def select_nodes(spec, nodes: str | None) -> list:
    """The spec's nodes (spares included), or those named in `--nodes a,b`, in spec order."""
    every = spec.nodes()
    if nodes is None:
        return every
    names = [n.strip() for n in nodes.split(",")]
    known = {n.name for n in every}
    if not all(names) or len(set(names)) != len(names):
        raise BurninError(f"--nodes {nodes!r}: a comma-separated list of distinct node names")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BurninError(f"--nodes: {', '.join(unknown)} not in stack {spec.name!r} (its nodes: "
                          f"{', '.join(sorted(known))[:300]})")
    return [n for n in every if n.name in names]
