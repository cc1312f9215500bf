#!/usr/bin/env python3
"""Goodput under periodic faults, aidc's failover beside plain torchrun elastic, same lab.

Three phases, each a fresh lab (no burn-in) training without end while a fatal fault hits a
random training node every --fault-every seconds for --duration seconds:

* aidc: XID 79 into the node's kernel log; the health agent detects it, failover quarantines
  the node (stops its workload, evicts it from the rendezvous) and the warm spare takes over;
  the repaired node comes back as the next spare (as bench/lab_failover.py does).
* baseline_default / baseline_tuned: the same lab (agents running, same trainer, same
  encrypted checkpoints every step) under plain `torchrun` (torch.distributed.run, module
  entry point: a fresh interpreter per worker), no failover controller, no eviction, no warm
  worker pool. The fault kills the node's processes (what XID 79 does to a job nobody
  quarantines: the GPU is gone); survivors fail their collective and torchrun restarts them;
  the dead node leaves the rendezvous when its heartbeat expires. A standby node waits on
  torchrun's redundancy list, and the repaired node comes back as the next standby.
  default: torchrun's defaults (heartbeat every 5 s, dead after 3 missed, last call 30 s).
  tuned: the rendezvous settings the lab gives torchrun (heartbeat every 3 s, dead after 3
  missed, last call 1 s); what the lab adds beyond torchrun's options (0.1 s rendezvous poll,
  warm worker pool, eviction) stays out.

ETTR is measured by aidc.goodput over the fault window from the job's step log; the
predicted ETTR comes from a model fed only with measured costs (see `predict`).

    .venv/bin/python bench/goodput.py --fault-every 60 --duration 600 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

AGENTS = Path(__file__).resolve().parents[1] / "agents"
sys.path.insert(0, str(AGENTS))
# Every process the lab starts (agents, launchers, workers) imports this checkout's aidc.
os.environ["PYTHONPATH"] = str(AGENTS) + os.pathsep + os.environ.get("PYTHONPATH", "")

from aidc.goodput import StepLog, account, read_step_log  # noqa: E402
from aidc.lab.run import LabRun, _read_jsonl, _wait, resume_s_after  # noqa: E402
from aidc.spec import load_stack  # noqa: E402

BASELINE_RDZV = {
    "default": {},
    # The lab's own rendezvous settings (lab/node_launcher.py): heartbeat every 3 s, dead after
    # 3 missed, last call 1 s. Heartbeats every 1 s (dead after 2) were tried first: on this
    # loaded 2-core machine they declared live nodes dead and torchrun restarted in a loop.
    "tuned": {"keep_alive_interval": 3, "keep_alive_max_attempt": 3, "last_call_timeout": 1},
}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def predict(g, resume_s: list[float], faults: int) -> dict:
    """ETTR from measured costs only, not from the timeline.

    Between faults the job is productive a fraction p of the time (its steps, against steps +
    checkpoint stalls + gaps: measured over the window's steady stretches). Each fault costs its
    resume time R (the mean of the measured fault -> first step of the new run: ETTR is linear in
    the sum of the resume times, and one slow resume moves it as much as its share) plus the work
    lost since the last durable checkpoint: on average half a checkpoint period (interval +
    stall) plus the background write's latency (an asynchronous checkpoint protects its step
    only once written). ETTR = p x (1 - faults x (R + lost) / wall)."""
    steady = g.seconds["productive"] + g.seconds["checkpoint"] + g.seconds["idle"]
    p = g.seconds["productive"] / steady if steady else 0.0
    interval = g.checkpoint_interval_s_median or g.step_s_median or 0.0
    lost = interval / 2 + (g.checkpoint_write_s_median or 0.0)
    r = statistics.mean(resume_s) if resume_s else 0.0
    ettr = p * max(0.0, 1 - faults * (r + lost) / g.wall_s) if g.wall_s else 0.0
    return {"predicted_ettr": round(ettr, 4), "steady_productive_fraction": round(p, 4), "resume_s_mean": round(r, 3),
            "lost_s_per_fault": round(lost, 4)}


def descendants(roots: list[int]) -> list[int]:
    """Every process below `roots` (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Phase:
    """One lab, its job, the fault schedule and the figures."""

    def __init__(self, name: str, spec, root: Path, seed: int):
        self.name = name
        self.run = LabRun(spec, "lab", root / name / "lab", progress=lambda m: say(f"{name}: {m}"))
        self.c = self.run.cluster
        self.rng = random.Random(seed)
        self.rows: list[dict] = []

    # -- the three things a phase does differently --------------------------------------
    def bring_up(self) -> None:
        raise NotImplementedError

    def fault(self, victim: str) -> dict:
        raise NotImplementedError

    def return_to_service(self, victim: str) -> None:
        raise NotImplementedError

    # -- the common loop ----------------------------------------------------------------
    def measure(self, fault_every: float, duration: float) -> dict:
        self.bring_up()
        t_start = time.time()
        say(f"{self.name}: fault window starts: a fault every {fault_every:g} s for {duration:g} s")
        next_fault, t_end = t_start + fault_every, t_start + duration
        while next_fault < t_end:
            time.sleep(max(0.0, next_fault - time.time()))
            world = _read_jsonl(self.run.steps_log)[-1]["world"]
            victim = self.rng.choice(world)
            m = self.fault(victim)
            m["at_s"] = round(m.pop("t_fault") - t_start, 2)
            self.rows.append(m)
            say(f"{self.name}: fault {len(self.rows)} on {victim} at +{m['at_s']} s: resume {m['resume_s']} s, "
                f"lost {m['steps_lost']} step(s)")
            self.return_to_service(victim)
            next_fault += fault_every
            if time.time() > next_fault:
                say(f"{self.name}: behind schedule by {time.time() - next_fault:.1f} s (return to service is slow)")
        time.sleep(max(0.0, t_end - time.time()))
        t_stop = max(t_end, time.time())
        g = account(read_step_log(self.run.goodput_log), since=t_start, until=t_stop)
        faults = len(self.rows)
        # A fault waits for the previous victim to be back as the spare, so on a slow machine the
        # faults come further apart than asked: the figures are for the interval they really had.
        out = {"ettr": round(g.ettr, 4), "faults": faults, "window_s": round(g.wall_s, 1),
               "fault_interval_actual_s": round(g.wall_s / faults, 1) if faults else None,
               "window": [round(t_start, 3), round(t_stop, 3)], "lab_dir": str(self.c.dir),
               "resume_s": [r["resume_s"] for r in self.rows],
               "resume_s_p50": pct([r["resume_s"] for r in self.rows], 50),
               "steps_lost": [r["steps_lost"] for r in self.rows],
               "seconds": {k: round(v, 2) for k, v in g.seconds.items()},
               "checkpoint_mode": g.checkpoint_mode, "checkpoint_stall_s_median": g.checkpoint_stall_s_median,
               "checkpoint_write_s_median": g.checkpoint_write_s_median, "step_s_median": g.step_s_median,
               "faults_detail": self.rows}
        out.update(predict(g, g.resume_s, faults))
        return out

    def first_step_without(self, victim: str, t_fault: float) -> dict:
        return _wait(f"a step without {victim}", lambda: next(
            (s for s in _read_jsonl(self.run.steps_log) if s["t"] > t_fault and victim not in s["world"]), None), 240, 0.05)

    def steps_lost(self, t_fault: float) -> int:
        start = next(s for s in _read_jsonl(self.c.dir / "train" / "starts.jsonl") if s["t"] > t_fault)
        done_before = max(s["step"] for s in _read_jsonl(self.run.steps_log) if s["t"] < start["t"])
        return max(0, done_before - start["resumed_from"])

    def stop(self) -> None:
        self.c.stop()
        self.c.disown()
        if self.run.audit is not None:
            self.run.audit.close()


class AidcPhase(Phase):
    def bring_up(self) -> None:
        self.run.bring_up(burn_in=False)
        self.run.start_training()

    def fault(self, victim: str) -> dict:
        m = self.run.inject_and_measure(victim, 79)  # also writes the fault into the step log
        t_fault = max(r["t"] for r in read_step_log(self.run.goodput_log) if r["kind"] == "fault")
        return {"victim": victim, "t_fault": t_fault, "detect_ms": m["detect_ms"], "resume_s": m["resume_s"],
                "steps_lost": m["steps_lost"]}

    def return_to_service(self, victim: str) -> None:
        self.run.return_to_service(victim)


class TorchrunPhase(Phase):
    def __init__(self, name: str, spec, root: Path, seed: int, rdzv: dict):
        super().__init__(name, spec, root, seed)
        self.rdzv = rdzv

    def argv(self, node: str) -> list[str]:
        lab = self.run.spec.lab
        primaries = [n for n in self.c.nodes if not n.spare]
        conf = ",".join(f"{k}={v}" for k, v in {"is_host": "false", "join_timeout": 300, **self.rdzv}.items())
        cfg = {"lab_dir": str(self.c.dir), "node": node, "job": self.c.info()["run_id"],
               "keyring": str(self.c.dir / "keyring"), "total_steps": lab.train_steps,
               "checkpoint_every": lab.checkpoint_every, "seed": 1234, "lr": 0.05}
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", f"{len(primaries)}:{len(primaries)}",
                "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{self.c.port('rdzv')}", "--rdzv-id", self.c.info()["run_id"], "--rdzv-conf", conf,
                "--max-restarts", "100", "--local-addr", "127.0.0.1", "-m", "aidc.lab.torchrun_worker",
                json.dumps(cfg)]

    def start_node(self, node: str) -> None:
        (self.c.node_dir(node) / "pgids.json").unlink(missing_ok=True)
        self.c.start(f"launcher:{node}", self.argv(node), node=node, workload=True)

    def bring_up(self) -> None:
        from aidc.audit import AuditLog
        from aidc.kms.local import LocalKeyring

        c = self.c
        c.create(owned=True)
        self.run.audit = AuditLog(c.audit_path)
        LocalKeyring.create(c.dir / "keyring", self.run.spec.kms.key_id)
        # What the lab runs besides failover: the rendezvous store and one health agent per node
        # (the same background load); no failover controller, so nothing evicts or quarantines.
        c.start_rendezvous_store()
        for n in c.nodes:
            c.start_agent(n.name)
        # The lab's external store needs torch's documented switch (docs/architecture.md).
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.run._goodput_writer().allocation()
        for n in c.nodes:
            if not n.spare:
                self.start_node(n.name)
        _wait("the first training step", lambda: _read_jsonl(self.run.steps_log), 600, 0.2)
        for n in c.nodes:  # after the first round is full: these are torchrun standbys
            if n.spare:
                self.start_node(n.name)
                _wait(f"{n.name} on the redundancy list", lambda: self.run._spares_waiting([n.name]), 300, 0.2)

    def fault(self, victim: str) -> dict:
        from aidc.failover.scheduler import LabScheduler

        # The node dies: its agent's process group and its workers, which torchrun starts in
        # sessions of their own (killing the group alone left the worker training on).
        groups = LabScheduler(self.c.dir).process_groups(victim)
        doomed = descendants(groups)
        t_fault = time.time()
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.run._goodput_writer().fault(t_fault, node=victim, what="node killed (baseline: nobody quarantines)")
        self.first_step_without(victim, t_fault)
        # aidc.milestones' resume_s, as the aidc arm measures it: the goodput accounting's figure.
        return {"victim": victim, "t_fault": t_fault, "resume_s": resume_s_after(self.run.goodput_log),
                "steps_lost": self.steps_lost(t_fault)}

    def return_to_service(self, victim: str) -> None:
        self.start_node(victim)
        _wait(f"{victim} on the redundancy list", lambda: self.run._spares_waiting([victim]), 300, 0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of the fault window per phase")
    p.add_argument("--phases", default="aidc,baseline_default,baseline_tuned")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lab-root", type=Path, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON document (progress goes to stderr)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    if not 5 <= args.fault_every <= args.duration:
        p.error("--fault-every must be at least 5 s and at most --duration")

    def interrupted(*_):  # SIGTERM stops the bench like Ctrl-C: each phase's lab is stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    spec = load_stack("lab")
    spec = spec.model_copy(update={"lab": spec.lab.model_copy(update={"train_steps": 10_000_000})})
    root = args.lab_root or Path(tempfile.mkdtemp(prefix="aidc-bench-goodput-"))
    results = {}
    for name in args.phases.split(","):
        if name == "aidc":
            phase: Phase = AidcPhase(name, spec, root, args.seed)
        elif name.startswith("baseline_") and name[9:] in BASELINE_RDZV:
            phase = TorchrunPhase(name, spec, root, args.seed, BASELINE_RDZV[name[9:]])
        else:
            p.error(f"unknown phase {name!r}")
        try:
            results[name] = phase.measure(args.fault_every, args.duration)
        finally:
            phase.stop()
    a = results.get("aidc", {})
    out = {
        "ettr": a.get("ettr"), "predicted_ettr": a.get("predicted_ettr"), "resume_s_p50": a.get("resume_s_p50"),
        "baseline_default_resume_s_p50": results.get("baseline_default", {}).get("resume_s_p50"),
        "baseline_tuned_resume_s_p50": results.get("baseline_tuned", {}).get("resume_s_p50"),
        "baseline_ettr": results.get("baseline_tuned", results.get("baseline_default", {})).get("ettr"),
        "baseline_default_ettr": results.get("baseline_default", {}).get("ettr"),
        "baseline_tuned_ettr": results.get("baseline_tuned", {}).get("ettr"),
        "fault_every_s": args.fault_every, "duration_s": args.duration,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "phases": results,
    }
    if a.get("ettr") and a.get("predicted_ettr"):
        out["prediction_error"] = round(abs(a["predicted_ettr"] - a["ettr"]) / a["ettr"], 4)
    if out["resume_s_p50"] and out["baseline_tuned_resume_s_p50"]:
        out["resume_ratio_vs_tuned"] = round(out["resume_s_p50"] / out["baseline_tuned_resume_s_p50"], 3)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text)
    if args.json:
        print(text)
    else:
        keys = ["ettr", "predicted_ettr", "prediction_error", "resume_s_p50", "baseline_default_resume_s_p50",
                "baseline_tuned_resume_s_p50", "resume_ratio_vs_tuned", "baseline_ettr"]
        print("\n".join(f"{k:32} {out.get(k)}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
