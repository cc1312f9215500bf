"""`aidc lab run`: the whole loop on one machine.

Bring up the lab from the stack file, burn every node in, start the node agents and
the failover controller, train under torchrun's elastic agent with a warm spare,
inject a fault into one training node, watch failover move the job to the spare,
finish training, write the report and verify the audit log.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aidc.audit import AuditLog
from aidc.audit.log import default_actor
from aidc.device import sim
from aidc.lab.cluster import LabCluster, LabError
from aidc.library_output import library_output_to
from aidc.milestones import ms_after
from aidc.polling import wait_for
from aidc.spec import ClusterSpec


@dataclass
class LabResult:
    certified_nodes: list[str] = field(default_factory=list)
    failed_nodes: list[str] = field(default_factory=list)
    victim: str | None = None
    xid: int | None = None
    # lab.ranks: gpu: the GPU taken out alone, and whether its node's other ranks were in the
    # first step after the fault (the node kept training).
    ranks: str = "node"
    victim_gpu: int | None = None
    node_kept_training: bool | None = None
    # aidc.milestones.DEFINITIONS: fault -> quarantine decided, -> quarantined, -> training resumed.
    detect_ms: float | None = None
    quarantine_ms: float | None = None
    resume_s: float | None = None
    steps_lost: int | None = None
    ettr: float | None = None
    train_steps: int = 0
    report_html: str = ""
    report_json: str = ""
    audit_db: str = ""
    audit_verified: bool = False
    # Which key the final checkpoint is encrypted under: provider, key_id, key_version, cipher.
    checkpoint_key: dict = field(default_factory=dict)
    completed: bool = False
    wall_s: float = 0.0
    scheduler: str = "lab"
    # Slurm only: the victim's drain reason exactly as `sinfo -R` shows it.
    drain_reason: str | None = None
    # Why the loop did not complete (the exception that ended it), for the report's verdict.
    error: str | None = None
    # Where the nodes talked: netns (rails, rate, scale; whether training ran on it) or loopback.
    fabric: dict = field(default_factory=lambda: {"kind": "loopback"})
    # aidc.goodput: the job's wall time by part (ettr above is its ETTR) and the advised
    # checkpoint interval (Young/Daly from the measured save cost and the observed MTBF).
    goodput: dict = field(default_factory=dict)
    checkpoint_advice: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resume_s_after(goodput_log: Path) -> float:
    """The newest fault's resume_s as aidc.goodput accounts it (milestones.DEFINITIONS["resume_s"]),
    rounded as `aidc goodput report` rounds it, so the lab's figure and the goodput's are one."""
    from aidc.goodput import job_report

    resumes = job_report(goodput_log).resume_s
    if not resumes:
        raise LabError(f"{goodput_log}: no step after the fault on a restarted job, so no resume to measure")
    return round(resumes[-1], 3)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


class TrainingProgress:
    """Says how training goes while the lab waits on it: step, loss, membership, at most every
    `every_s` seconds and whenever the membership changes (a silent minute looks like a hang)."""

    def __init__(self, steps_log: Path, total_steps: int, say: Callable[[str], None], every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.steps_log, self.total, self.say, self.every_s, self.clock = steps_log, total_steps, say, every_s, clock
        self._said_at = self._read_at = 0.0
        self._step, self._world = -1, None

    def __call__(self) -> None:
        """Called from the lab's waits; says something only when there is news."""
        now = self.clock()
        if now - self._read_at < 0.5:  # the log is read at most twice a second
            return
        self._read_at = now
        steps = _read_jsonl(self.steps_log)
        if not steps:
            return
        last = steps[-1]
        changed = self._world is not None and last["world"] != self._world
        if last["step"] == self._step or (now - self._said_at < self.every_s and not changed):
            return
        loss = last.get("loss")
        self.say(f"training: step {last['step']}/{self.total}"
                 + (f"  loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                 + f"  {'new membership' if changed else 'on'} {', '.join(last['world'])}")
        self._said_at, self._step, self._world = now, last["step"], last["world"]


def _wait(what: str, predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.02):
    return wait_for(what, predicate, timeout_s, poll_s, error=LabError)


class Reminder:
    """A wait's predicate that says "waiting for <what> (N s)" every `every_s` seconds while it
    waits, so no stage of the lab is silent for longer than that."""

    def __init__(self, what: str, predicate: Callable[[], object], say: Callable[[str], None], every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.predicate, self.say, self.every_s, self.clock = what, predicate, say, every_s, clock
        self.started = self._said = clock()

    def __call__(self):
        now = self.clock()
        if now - self._said >= self.every_s:
            self.say(f"waiting for {self.what} ({now - self.started:.0f} s)")
            self._said = now
        return self.predicate()


class LabRun:
    def __init__(self, spec: ClusterSpec, stack: str, lab_dir: Path, progress: Callable[[str], None] = print,
                 scheduler: str = "lab"):
        self.spec, self.stack = spec, stack
        if scheduler == "slurm":
            from aidc.lab.slurm_lab import SlurmLabCluster

            # Progress goes where the caller says (stderr under --json): stdout holds the summary only.
            self.cluster: LabCluster = SlurmLabCluster(spec, lab_dir, stack, say=progress)
        else:
            self.cluster = LabCluster(spec, lab_dir, say=progress)
        self.say = progress
        self.result = LabResult(scheduler=scheduler, ranks=spec.lab.ranks)
        self.actor = default_actor("lab")
        self.audit: AuditLog | None = None  # opened by bring_up(), once the lab directory exists
        # From bring_up() to the end of run(): torch's own warnings go to <lab>/logs/libraries.log.
        self._library_output = contextlib.ExitStack()
        # Training progress lines, one reporter for the whole run (made when training starts): the
        # membership it said last is what a new one is told apart from.
        self.progress: TrainingProgress | None = None

    @property
    def slurm(self) -> bool:
        return self.result.scheduler == "slurm"

    @property
    def steps_log(self) -> Path:
        return self.cluster.dir / "train" / "steps.jsonl"

    @property
    def goodput_log(self) -> Path:
        """The job's goodput step log (aidc.goodput.StepLog; rank 0 writes steps and checkpoints)."""
        return self.cluster.dir / "train" / "goodput.jsonl"

    def _goodput_writer(self):
        from aidc.goodput import StepLog

        return StepLog(self.goodput_log, job=self.cluster.info()["run_id"])

    def bring_up(self, burn_in: bool = True) -> None:
        """Create the lab, burn it in, start the agents and the controller (not the training)."""
        c = self.cluster
        c.create(owned=True)
        self._library_output.enter_context(library_output_to(c.dir / "logs" / "libraries.log"))
        self.audit = AuditLog(c.audit_path)
        self.result.audit_db = str(c.audit_path)
        self.audit.append("lab.start", f"lab from stack {self.stack}", actor=self.actor,
                          payload={"nodes": [n.name for n in c.nodes], "lab_dir": str(c.dir), "stack": self.stack})
        self._create_keyring()
        c.bring_up_fabric()
        if c.fabric is not None:
            self.result.fabric = {"kind": "netns", "rails": c.fabric.rails, "rail_mbit": c.fabric.rail_mbit,
                                  "scale": c.fabric.scale, "training": c.training_fabric is not None}
        if burn_in:
            self._burnin()
        self._start_services()

    def run(self, keep: bool = False) -> LabResult:
        started = time.monotonic()
        try:
            self.bring_up()
            self._train_and_fail_over()
            self.result.completed = True
        except Exception as exc:
            self.result.error = str(exc)  # the report's verdict banner says what failed
            raise
        finally:
            if self.audit is not None:  # else create() refused (a lab already running): touch nothing
                if not keep:
                    self.cluster.stop()
                self._finish(started)
                self.cluster.disown()
            self._library_output.close()
        return self.result

    # -- stages -----------------------------------------------------------------------
    def _burnin(self) -> None:
        from aidc.burnin.runner import run_burnin

        self.say(f"burn-in: {len(self.cluster.nodes)} nodes (GEMM, memory copy, five collective sweeps, DDP/FSDP/pipeline"
                 " + SDC check)")
        node_dirs = {n.name: self.cluster.node_dir(n.name) for n in self.cluster.nodes}
        report = run_burnin(self.spec, node_dirs, self.audit, progress=self.say, fabric=self.cluster.fabric)
        self.result.certified_nodes = sorted(report.certified_nodes)
        self.result.failed_nodes = sorted(report.failed_nodes)
        self.say(f"burn-in: certified {', '.join(self.result.certified_nodes) or 'none'}"
                 + (f"; FAILED {', '.join(self.result.failed_nodes)}" if self.result.failed_nodes else ""))
        if self.result.failed_nodes:
            raise LabError(f"burn-in failed on {', '.join(self.result.failed_nodes)}: see the report")

    def _create_keyring(self) -> None:
        """The lab's own local keyring (<lab>/keyring): the trainer encrypts checkpoints under it."""
        from aidc.kms.local import LocalKeyring

        from aidc.audit.log import configure_signing

        keyring = LocalKeyring.create(self.cluster.dir / "keyring", self.spec.kms.key_id)
        # From here on the log is signed with this keyring: the sidecar names it for every
        # writer (agents, controller, receiver), and this writer signs the records before it
        # at once through the anchor.
        configure_signing(self.cluster.audit_path, keyring.path, keyring.key_id)
        self.audit.use_signer(keyring)
        self.audit.append("kms.keyring.created", f"local keyring for key {keyring.key_id}; the audit log "
                          "is signed with it from here on", actor=self.actor, payload=keyring.status())
        # The lab run is this state directory's installer: privileged commands take roles and
        # policy from this record, and every audit verifier the signing key (aidc.installation).
        from aidc.installation import record

        record(self.cluster.dir, self.spec, self.stack, public_key_pem=keyring.public_key_pem(),
               key_id=keyring.key_id, recorded_by=self.actor)

    def _start_services(self) -> None:
        c = self.cluster
        if self.slurm:
            self.say(f"starting a private Slurm under {c.slurm.root}: munged, slurmctld, one slurmd per node")
            c.start_slurm()
        self.say("starting the rendezvous store, one health agent per node and the failover controller")
        c.start_rendezvous_store()
        for n in c.nodes:
            c.start_agent(n.name)
        c.start_controller(self.stack)
        self._start_goodput_exporter()

    def _start_goodput_exporter(self) -> None:
        """`aidc goodput serve` on the job's step log: aidc_goodput_ettr{job} while the lab runs."""
        from aidc.polling import free_port

        c = self.cluster
        data = c.info()
        data["ports"]["goodput"] = port = free_port()
        c._write(data)
        c.start("goodput-exporter", c.aidc("goodput", "serve", "--job", f"{data['run_id']}={self.goodput_log}",
                                           "--listen-address", f"127.0.0.1:{port}"))

    def _train_and_fail_over(self) -> None:
        lab = self.spec.lab
        self.start_training()
        self.progress = progress = TrainingProgress(self.steps_log, lab.train_steps, self.say)
        last = _wait(f"step {lab.inject_at_step}",
                     lambda: progress() or next((s for s in reversed(_read_jsonl(self.steps_log)) if s["step"] >= lab.inject_at_step), None), 180)
        if self.cluster.ranks_per_gpu:
            # The last member of the step's world is one GPU's rank, "node/gpuN": a fault on that
            # GPU alone, of a kind the catalog keeps in one GPU.
            node, _, gpu = last["world"][-1].partition("/gpu")
            m = self.inject_and_measure(node, lab.gpu_inject_xid, gpu=int(gpu))
            self.result.victim_gpu, self.result.node_kept_training = m["gpu"], m["node_kept_training"]
        else:
            m = self.inject_and_measure(last["world"][-1], lab.inject_xid)
        self.result.victim, self.result.xid = m["victim"], m["xid"]
        self.result.detect_ms, self.result.quarantine_ms = m["detect_ms"], m["quarantine_ms"]
        self.result.resume_s, self.result.steps_lost = m["resume_s"], m["steps_lost"]
        if self.slurm:
            self.result.drain_reason = self._wait(f"{m['victim']}'s drain reason in `sinfo -R`",
                                             lambda: self.cluster.drain_reason(m["victim"]), 30, 0.1)
            self.say(f"slurm: {m['victim']} drained, sinfo -R: {self.result.drain_reason}")
        self.finish_training()
        # The lab's targets, checked like its other outcomes: a run that misses one fails.
        if self.result.steps_lost > lab.checkpoint_every:
            raise LabError(f"steps_lost {self.result.steps_lost} exceeds the checkpoint interval "
                           f"({lab.checkpoint_every} step(s)): the job did not resume from the last checkpoint")

    def start_training(self) -> None:
        c, lab = self.cluster, self.spec.lab
        primaries = [n.name for n in c.nodes if not n.spare]
        spares = [n.name for n in c.nodes if n.spare]
        per = ", one rank per GPU" if c.ranks_per_gpu else ""
        self.say(f"training: {lab.train_steps} steps on {', '.join(primaries)} (elastic{per}, checkpoint every"
                 f" {lab.checkpoint_every} step(s)); spare(s) {', '.join(spares)} wait warm")
        if self.slurm:
            job = c.start_training_job(primaries, spares)
            self.say(f"slurm: training is job {job}, one step per node ({c.job_script})")
        else:
            for name in primaries:
                c.start_trainer(name)
            for name in spares:  # joins only after the first round is full: it is the spare
                c.start_trainer(name, spare=True)
        # Training starts when every node is warm (torch imported in its agent and worker
        # pool), so the spare is ready before the job needs it.
        if self.slurm:
            try:  # a job Slurm ended or never started is said at once, with Slurm's reason
                self._wait("every node's elastic agent to warm up",
                      lambda: len(c.warm_nodes()) == len(c.nodes) or c.check_job_alive(), 300, 0.5)
            except LabError as exc:
                raise LabError(f"{exc}; warm: {', '.join(c.warm_nodes()) or 'none'}; Slurm: {c.job_state()}") from None
        else:
            self._wait("every node's elastic agent to warm up", lambda: len(c.warm_nodes()) == len(c.nodes), 300, 0.1)
        # The job's allocation starts now: its nodes are certified and warm (aidc.goodput).
        self._goodput_writer().allocation()
        c.open_start_gate()
        self._wait("the first training step", lambda: _read_jsonl(self.steps_log), 180)
        self._wait("the spare to wait on the rendezvous redundancy list", lambda: self._spares_waiting(spares),
                   120, 0.1)

    def inject_and_measure(self, victim: str, xid: int = 79, gpu: int = 0) -> dict:
        """Write XID `xid` on `victim`'s GPU `gpu` into its kernel log; measure detection,
        resumption and loss. With a rank per GPU the member that must leave is that GPU's rank."""
        c = self.cluster
        step_now = _read_jsonl(self.steps_log)[-1]["step"]
        injected = sim.inject(c.node_dir(victim), "xid", gpu, xid=xid)
        t_fault = injected["written_at"]
        self.audit.append("lab.inject", f"injected XID {xid} on {victim} gpu {gpu}", actor=self.actor,
                          node=victim, payload=injected)
        self.say(f"fault: XID {xid} written to {victim}'s kernel log (gpu {gpu}) at step {step_now}")
        gone = f"{victim}/gpu{gpu}" if c.ranks_per_gpu else victim

        decision = self._wait("the quarantine decision", lambda: self._quarantine_decision(victim, after=t_fault), 60)
        detect_ms = ms_after(t_fault, decision.ts)
        self._goodput_writer().fault(t_fault, node=victim, detected_t=decision.ts, what=f"XID {xid}")
        action = self._wait("the scheduler's quarantine", lambda: self._quarantine_action(victim, after=t_fault), 60)
        quarantine_ms = ms_after(t_fault, action.ts)
        self.say(f"failover: quarantine of {gone} decided {detect_ms:.0f} ms after the fault, "
                 f"{gone} out of service {quarantine_ms:.0f} ms after it")

        first_new = self._wait("a step on the new membership",
                          lambda: next((s for s in _read_jsonl(self.steps_log) if s["t"] > t_fault and gone not in s["world"]), None), 120)
        # With a rank per GPU: the node's other GPUs' ranks in the new membership = it kept training.
        kept = [m for m in first_new["world"] if m.startswith(f"{victim}/")] if c.ranks_per_gpu else []
        resume_s = resume_s_after(self.goodput_log)
        start = next(s for s in _read_jsonl(c.dir / "train" / "starts.jsonl") if s["t"] > t_fault)
        done_before = max(s["step"] for s in _read_jsonl(self.steps_log) if s["t"] < start["t"])
        steps_lost = max(0, done_before - start["resumed_from"])
        said = (f"; {victim} kept training on {', '.join(kept)}" if kept else
                f"; {victim} has no rank in it" if c.ranks_per_gpu else "")
        self.audit.append("lab.resume", f"training resumed on {', '.join(first_new['world'])}{said}", actor=self.actor,
                          payload={"resume_s": resume_s, "resumed_from_step": start["resumed_from"],
                                   "steps_lost": steps_lost, "world": first_new["world"], "victim": victim,
                                   **({"victim_gpu": gpu, "taken_out": gone, "node_kept_training": bool(kept),
                                       "node_ranks_training": kept} if c.ranks_per_gpu else {})})
        self.say(f"resumed: step {first_new['step']} on {', '.join(first_new['world'])} {resume_s:.2f} s"
                 f" after the fault, {steps_lost} step(s) lost{said}")
        return {"victim": victim, "xid": xid, "detect_ms": detect_ms, "quarantine_ms": quarantine_ms,
                "resume_s": resume_s, "steps_lost": steps_lost, "world": first_new["world"], "gpu": gpu,
                "node_kept_training": bool(kept)}

    def return_to_service(self, node: str) -> None:
        """Repair a quarantined lab node and bring it back as the new warm spare (operator path)."""
        from aidc.failover.controller import FailoverController
        from aidc.lab.cluster import lab_scheduler
        from aidc.store import Store

        c = self.cluster
        if self.slurm:
            raise LabError("returning a node to service is implemented for the lab scheduler only")
        sim.inject(c.node_dir(node), "clear")
        store = Store(c.store_path)
        try:
            FailoverController(self.spec, store, self.audit, lab_scheduler(c.dir)).release(
                node, "lab: GPU repaired (fault cleared)", actor="lab-operator")
        finally:
            store.close()
        c.restart_trainer(node, spare=True)
        self._wait(f"{node} to wait as the spare", lambda: self._spares_waiting([node]), 120, 0.1)

    def finish_training(self) -> None:
        c = self.cluster
        progress = self.progress or TrainingProgress(self.steps_log, self.spec.lab.train_steps, self.say)
        _wait("the end of training", lambda: progress() or (c.dir / "train" / "done.json").exists(), 600, poll_s=0.2)
        # Let the launchers exit on their own (barrier, teardown) before anything is stopped.
        if self.slurm:
            launchers_running = c.training_running
        else:
            def launchers_running():
                return [p for p in c.running() if p["name"].startswith("launcher:")]
        try:
            self._wait("the training launchers to exit", lambda: not launchers_running(), 30, 0.2)
        except LabError:
            self.say("warning: a training launcher did not exit by itself; stopping it")
        steps = _read_jsonl(self.steps_log)
        self.result.train_steps = max(s["step"] for s in steps)
        self.result.checkpoint_key = self.checkpoint_key()
        self.result.ettr = self._ettr(steps)
        self._goodput()

    def checkpoint_key(self) -> dict:
        """The key the newest checkpoint is encrypted under, read from its header."""
        from aidc.checkpoint import read_header

        ckpts = sorted((self.cluster.dir / "checkpoints").glob("step-*.ckpt"))
        if not ckpts:
            return {}
        h = read_header(ckpts[-1]).to_dict()
        return {"checkpoint": ckpts[-1].name, "cipher": h["cipher"], "provider": h["provider"],
                "key_id": h["key_id"], "key_version": h["key_version"]}

    def _spares_waiting(self, spares: list[str]) -> bool:
        c = self.cluster
        state = c.read_rendezvous_state()
        if state is None:
            return False
        pids = set().union(*(c.launcher_pids(n) for n in spares)) if spares else set()
        return pids <= {node.pid for node in state.redundancy_list}

    def _quarantine_decision(self, node: str, after: float = 0.0):
        for rec in self.audit.records(kind="failover.decision", node=node):
            if rec.payload.get("verdict") in ("quarantine", "quarantine_gpu") and rec.ts > after:
                return rec
        return None

    def _wait(self, what: str, predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.02):
        return _wait(what, Reminder(what, predicate, self.say), timeout_s, poll_s)

    def _quarantine_action(self, node: str, after: float = 0.0):
        """The scheduler's action on `node` after `after` (the audit report's "quarantine" step)."""
        return next((rec for rec in self.audit.records(kind="failover.action", node=node) if rec.ts > after), None)

    def _ettr(self, steps: list[dict]) -> float:
        """Effective training time ratio from the job's goodput step log (aidc.goodput):
        productive training time / wall time of the job's allocation."""
        from aidc.goodput import job_report

        return round(job_report(self.goodput_log).ettr, 3)

    def _goodput(self) -> None:
        """The ETTR breakdown and the checkpoint-interval advice, with the MTBF this lab's audit
        log observed; both also go to the audit log for the report."""
        from aidc.goodput import AdviceError, job_advice, job_report

        self.result.goodput = job_report(self.goodput_log).to_dict()
        try:
            self.result.checkpoint_advice = job_advice(self.goodput_log, audit_db=self.cluster.audit_path)
        except AdviceError as exc:
            self.result.checkpoint_advice = {"error": str(exc)}
        self.audit.append("goodput.report", f"job {self.result.goodput['job']}: ETTR {self.result.goodput['ettr']}",
                          actor=self.actor, payload={"goodput": self.result.goodput,
                                                     "checkpoint_advice": self.result.checkpoint_advice})

    def _finish(self, started: float) -> None:
        from aidc.audit.report import write_report

        self.result.wall_s = round(time.monotonic() - started, 1)
        report_dir = self.cluster.dir / "report"
        self.result.report_html, self.result.report_json = str(report_dir / "report.html"), str(report_dir / "report.json")
        self.audit.append("lab.summary", "lab loop " + ("completed" if self.result.completed else "did not complete"),
                          actor=self.actor, payload=self.result.to_dict())
        _, _, verified = write_report(self.audit, report_dir)
        self.result.audit_verified = verified.ok
        self.audit.close()
