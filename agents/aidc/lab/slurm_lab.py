"""The lab on a real Slurm: `aidc lab run --scheduler slurm`.

Everything else is the lab as it is (nodes, burn-in, agents, rendezvous store, controller); what
changes is who runs the training and who takes a node out of service:

* A private Slurm (`LocalSlurm`: own munged, one slurmctld, one slurmd per lab node) lives under
  `<lab>/slurm` and is recorded in lab.json, so `aidc lab down` stops it by PID, also after a
  killed run.
* Training is ONE batch job over all lab nodes. Its script starts one job step per node
  (`srun -N1 -n1 -w <node>`), each running that node's torchrun elastic agent
  (`aidc.lab.node_launcher`, the same warm forkserver and start gate as the lab). One step per
  node because a step is what Slurm can cancel on its own: draining a node and cancelling its
  step stops exactly that node's part while the other steps, and the job, go on.
* The failover controller reads a stack view (`<lab>/stack-slurm.yaml`: the lab's stack with
  `scheduler: slurm` and `slurm.conf` = the private conf), so its scheduler backend is the real
  Slurm one (drain + cancel the node's steps), wrapped to evict the node from the rendezvous at
  once, as the lab backend does.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from aidc.files import SHARED_MODE, write_atomic
from aidc.lab.cluster import RUN_ID, LabCluster, LabError, evict_from_rendezvous
from aidc.lab.slurm_cluster import LocalSlurm, SlurmLabError, SlurmNode, missing_packages
from aidc.spec import CONFIG_KEY, ClusterSpec, load_stack, stack_path

JOB_NAME = "aidc-lab-train"
STACK_VIEW = "stack-slurm.yaml"


def check_slurm_available() -> None:
    """Refuse early, in one line, where a private Slurm cannot run."""
    missing = missing_packages()
    if missing:
        raise LabError(f"--scheduler slurm needs Slurm (missing {', '.join(missing)}): run `make system-deps`")
    if os.geteuid() != 0:
        raise LabError("--scheduler slurm needs root: slurmd launches job steps as their user")


class SlurmLabCluster(LabCluster):
    """A lab whose training runs as a Slurm job on a private Slurm of the lab's nodes."""

    trains_on_fabric = False  # job steps start in the root namespace (slurmd's): training stays on loopback

    def __init__(self, spec: ClusterSpec, lab_dir: str | os.PathLike, stack: str = "lab", say=print):
        super().__init__(spec, lab_dir, say=say)
        self.stack = stack
        # Features `train` and `spare`: the job's batch script runs on a spare (`sbatch --batch`),
        # so a node a fault drains only trains (a drained batch host cannot be cut out of a job:
        # its script is left running and reported, or the job requeued).
        self.slurm = LocalSlurm(self.dir / "slurm", [SlurmNode(n.name, n.gpus, features=("spare" if n.spare else "train",))
                                                     for n in self.nodes])

    @property
    def stack_view(self) -> Path:
        return self.dir / STACK_VIEW

    def create(self, owned: bool = False) -> None:
        super().create(owned=owned)
        data = self.info()
        # Recorded before anything starts: a run killed while Slurm comes up is still cleaned up.
        data["slurm"] = {"root": str(self.slurm.root), "conf": str(self.slurm.conf)}
        self._write(data)
        self._write_stack_view()

    def _write_stack_view(self) -> None:
        """The lab's stack as the controller sees it: the same cluster, scheduled by this Slurm."""
        doc = yaml.safe_load(stack_path(self.stack).read_text(encoding="utf-8"))
        cluster = doc["config"][CONFIG_KEY]
        cluster["scheduler"] = "slurm"
        cluster["slurm"] = {**(cluster.get("slurm") or {}), "conf": str(self.slurm.conf)}
        write_atomic(self.stack_view, "# Written by `aidc lab run --scheduler slurm`: the lab's stack on its private "
                     "Slurm.\n" + yaml.safe_dump(doc, sort_keys=False), SHARED_MODE)
        load_stack(self.stack_view)  # a view that does not validate is a bug here, not at the controller

    def start_slurm(self) -> None:
        try:
            self.slurm.start()
        except SlurmLabError as exc:
            raise LabError(str(exc)) from None

    def start_controller(self, stack: str) -> subprocess.Popen:
        return super().start_controller(str(self.stack_view))

    # -- the training job ---------------------------------------------------------------
    @property
    def job_script(self) -> Path:
        return self.dir / "train" / "job.sh"

    def start_training_job(self, primaries: list[str], spares: list[str]) -> str:
        """Submit the training job: one step per node, spares last (they join as spares)."""
        (self.dir / "train").mkdir(parents=True, exist_ok=True)
        steps = [self._step_line(n, spare=False) for n in primaries] + [self._step_line(n, spare=True) for n in spares]
        write_atomic(self.job_script, "\n".join([
            "#!/bin/bash",
            "# Written by `aidc lab run --scheduler slurm`. One job step per node, each running that",
            "# node's torchrun elastic agent: cancelling one node's step stops only that node's part.",
            *steps,
            "wait  # every step's exit status is in its log; the job ends when the last step does",
            "",
        ]), SHARED_MODE)
        nodes = primaries + spares
        gpus = max(n.gpus for n in self.nodes)
        out = self.slurm.run(
            "sbatch", "--parsable", f"--job-name={JOB_NAME}", f"--nodes={len(nodes)}", f"--nodelist={','.join(nodes)}",
            "--ntasks-per-node=1", f"--gres=gpu:{gpus}", f"--chdir={self.dir}", "--export=ALL",
            # Elastic training replaces a node in place; a requeue would restart every node.
            "--no-requeue",
            # The batch script on a spare; --batch must be a subset of the job's constraint.
            *(["--constraint=train|spare", "--batch=spare"] if spares else []),
            f"--output={self.dir / 'logs' / 'train-job.log'}", str(self.job_script))
        job_id = out.stdout.strip().split(";")[0]
        data = self.info()
        data["slurm"]["job_id"] = job_id
        self._write(data)
        return job_id

    def _step_line(self, node: str, spare: bool) -> str:
        lab = self.spec.lab
        gpus = next(n.gpus for n in self.nodes if n.name == node)
        primaries = sum(1 for n in self.nodes if not n.spare)
        srun = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", f"--gres=gpu:{gpus}",
                # A cancelled (quarantined) step must not end the others: no kill-on-bad-exit.
                "--kill-on-bad-exit=0", f"--job-name=launcher:{node}",
                f"--output={self.dir / 'logs' / f'launcher:{node}.log'}"]
        launcher = [sys.executable, "-m", "aidc.lab.node_launcher", "--node", node, "--lab-dir", str(self.dir),
                    "--rdzv", f"127.0.0.1:{self.port('rdzv')}", "--run-id", RUN_ID, "--nnodes", str(primaries),
                    "--total-steps", str(lab.train_steps), "--checkpoint-every", str(lab.checkpoint_every),
                    "--start-gate", str(self.start_gate), *(["--spare"] if spare else [])]
        return " ".join(shlex.quote(a) for a in srun + launcher) + " &"

    def job_id(self) -> str | None:
        return self.info().get("slurm", {}).get("job_id")

    def training_running(self) -> bool:
        job = self.job_id()
        if not job:
            return False
        return bool(self.slurm.run("squeue", "-h", "-j", job, check=False).stdout.strip())

    def job_state(self) -> str:
        """The training job as squeue shows it: `RUNNING (None)`, `PENDING (Resources)`, or `gone`."""
        job = self.job_id()
        out = self.slurm.run("squeue", "-h", "-j", job, "-o", "%T (%r)", check=False).stdout.strip() if job else ""
        return out or "gone"

    def check_job_alive(self) -> bool:
        """False while the training job is queued or running; raises once it has ended."""
        if self.job_id() and not self.training_running():
            raise LabError(f"training job {self.job_id()} ended before training started: see "
                           f"{self.dir / 'logs'}/train-job.log and launcher:*.log")
        return False

    def drain_reason(self, node: str) -> str | None:
        """The node's reason exactly as `sinfo -R` shows it (its REASON column at full width: the
        default format cuts it to 20 characters), or None when the node has no reason."""
        out = self.slurm.run("sinfo", "-R", "-h", "-N", "-n", node, "-o", "%E", check=False).stdout
        reason = out.rstrip("\n")
        return reason or None


def lab_slurm_scheduler(lab_dir: str | os.PathLike, spec: ClusterSpec, audit=None, actor: str = "aidc-slurm"):
    """The Slurm backend for a lab's private Slurm, or None when `spec` is not that lab's view.

    It tells the rendezvous at once about a quarantine, as `lab_scheduler` does: drain and cancel
    the node's step (SlurmScheduler), then evict the node from the rendezvous."""
    from aidc.failover.slurm import SlurmScheduler

    lab_dir = Path(lab_dir)
    try:
        recorded = json.loads((lab_dir / "lab.json").read_text()).get("slurm") or {}
    except (OSError, ValueError):
        return None
    if not spec.slurm.conf or recorded.get("conf") != spec.slurm.conf:
        return None
    world_size = len(spec.nodes(include_spares=False))
    return EvictingScheduler(SlurmScheduler.from_spec(spec, audit=audit, actor=actor),
                             lambda node: evict_from_rendezvous(lab_dir, node, world_size))


class EvictingScheduler:
    """A scheduler backend that, after a quarantine, runs a best-effort hook (rendezvous eviction)."""

    def __init__(self, inner, on_quarantine):
        self.inner, self.on_quarantine = inner, on_quarantine
        self.name = inner.name

    def quarantine(self, node: str, reason: str, **kwargs) -> str | None:
        problem = self.inner.quarantine(node, reason, **kwargs)
        try:
            self.on_quarantine(node)
        except Exception as exc:  # the node is out of service already; heartbeat expiry drops it later
            hook = f"on_quarantine hook failed: {exc!r}"
            return f"{problem}; {hook}" if problem else hook
        return problem

    def release(self, node: str, reason: str):
        return self.inner.release(node, reason)

    def state(self, node: str) -> str:
        return self.inner.state(node)

    def __getattr__(self, name):  # anything else the backend offers (e.g. counting down nodes)
        return getattr(self.inner, name)
