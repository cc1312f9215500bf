"""The lab's launcher: every node a forked process on this machine (aidc.burnin.runner), on the
lab's netns fabric where it can be built. The fast path `make lab` runs."""

from __future__ import annotations

from aidc.burnin.launch import LaunchResult
from aidc.errors import BurninError


class LabLauncher:
    name = "lab"

    def run(self, spec, nodes, *, lab_dir, audit, progress, timeout_s, say, known_answers=None,
            soak_s: float = 0.0, tests=None) -> LaunchResult:
        from aidc.burnin import baseline
        from aidc.burnin.runner import lab_node_dirs, run_burnin  # torch is imported inside run_burnin
        from aidc.lab import fabric as lab_fabric

        if spec.device_backend != "sim":  # before lab_node_dirs makes simulated nodes for it
            raise BurninError(f"the lab launcher forks simulated nodes on this machine; stack {spec.name!r} uses the"
                              f" {spec.device_backend} backend (schedule it with `scheduler: slurm`)")
        baselines = baseline.load(baseline.path_for(lab_dir))  # a bad file is an error before any node runs
        dirs = lab_node_dirs(spec, lab_dir)
        # The stack's netns fabric, when it has one: the lab's if it is up (`aidc lab fabric`, a kept
        # lab run: link faults injected there are measured), else one built for this run and removed
        # after it. The scale it was shaped to goes to `say` (stderr), never into --json.
        already_up = lab_fabric.load(lab_dir) is not None
        fabric = lab_fabric.ensure(spec, lab_dir, say=say)
        try:
            report = run_burnin(spec, dirs, audit, progress=progress, timeout_s=timeout_s, fabric=fabric,
                                only=frozenset(n.name for n in nodes), known_answers=known_answers, soak_s=soak_s,
                                baselines=baselines, tests=tests)
        finally:
            if fabric is not None and not already_up:
                lab_fabric.teardown(lab_dir)
        return LaunchResult(report)


LAUNCHER = LabLauncher()
