"""Stragglers while training: does the agent find a slowed node, and only that one?

    python bench/stragglers.py [--trials 20] [--nodes 4] [--mode mixed|compute|rail] [--json]

One data-parallel job of the lab's trainer (aidc.lab.trainer: real torch.distributed, gloo,
one process per simulated node) runs for the whole bench. One health agent per node (the real
aidc.health.agent.HealthAgent, in this process, sharing one event store) follows its node's
step-time report. Each trial:

1. a clean stretch of `--clean-steps` steps: any straggler event then is a false positive;
2. a random node is slowed: `compute` sets its simulated GPU's slowdown to `--factor` (1.1:
   10% more real compute each step, aidc.lab.trainer._straggle); `rail` runs
   `aidc device inject NODE_DIR link --rail R --rate 0.5` (a random rail unless `--rail`);
   `mixed` (the default, the issue's bench) picks one of the two per trial. In `rail` and
   `mixed` modes the bench brings up the lab's netns fabric (aidc.lab.fabric: a namespace
   per node, a shaped bridge per rail), runs each rank in its node's namespace with gloo over
   the rails, turns on the trainer's link probe (aidc.lab.trainer.LinkProbe) and removes the
   fabric when it ends (errors and Ctrl-C included);
3. the time and steps until that node's straggler event, within `--max-steps`; an event for
   any other node is a false positive;
4. the slowdown is taken away and the bench waits until the node's condition clears.

Prints recall (trials detected / trials; goal 1.0), false_positives (goal 0) and the time and
steps to detect.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agents"))

from aidc.audit.log import AuditLog  # noqa: E402
from aidc.device import sim  # noqa: E402
from aidc.events import FaultKind  # noqa: E402
from aidc.health.agent import HealthAgent  # noqa: E402
from aidc.health.stragglers import STEP_TIMES_FILE  # noqa: E402
from aidc.polling import free_port  # noqa: E402
from aidc.spec import StragglerPolicy  # noqa: E402
from aidc.store import Store  # noqa: E402

WORKER = """
import json, sys
from aidc.lab.trainer import train
sys.exit(train(json.loads(sys.argv[1])))
"""


class Job:
    """The trainer's ranks, one process per node, in one process group of their own."""

    def __init__(self, lab: Path, nodes: list[str], steps: int, fabric=None, probe_every: int = 5):
        """`fabric` (aidc.lab.fabric.Fabric): each rank in its node's namespace, the rendezvous on
        the management bridge, gloo over the rails, and the link probe on."""
        from aidc.kms.local import LocalKeyring

        keyring = LocalKeyring.create(lab / "keyring", "aidc-bench-key")
        port = free_port()  # for torch's rendezvous store, which binds it later
        self.procs = []
        env = dict(os.environ, PYTHONPATH=str(ROOT / "agents"), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), WORLD_SIZE=str(len(nodes)), GLOO_SOCKET_IFNAME="lo")
        if fabric is not None:
            env.update(MASTER_ADDR=fabric.nodes[nodes[0]].mgmt_addr, GLOO_SOCKET_IFNAME=",".join(fabric.ifnames))
        for rank, node in enumerate(nodes):
            cfg = {"lab_dir": str(lab), "node": node, "job": "bench-stragglers", "keyring": str(keyring.path),
                   "total_steps": steps, "checkpoint_every": steps, "seed": 7, "lr": 0.01}
            argv = [sys.executable, "-c", WORKER]
            if fabric is not None:
                cfg["link_probe"] = {"rails": fabric.rails, "every": probe_every}
                argv = ["ip", "netns", "exec", fabric.nodes[node].netns, *argv]  # execs: the same pid
            log = open(lab / f"{node}.log", "wb")
            self.procs.append(subprocess.Popen(
                [*argv, json.dumps(cfg)], stdout=log, stderr=subprocess.STDOUT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": "0"}, start_new_session=True))
            log.close()

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


class Fleet:
    """One health agent per node on one store; the bench steps them itself."""

    def __init__(self, lab: Path, nodes: list[str], policy: StragglerPolicy):
        self.lab, self.nodes = lab, nodes
        self.store = Store(lab / "state.db")
        self.audit = AuditLog(lab / "audit.db")
        self.agents = {n: HealthAgent(n, sim.SimBackend(lab / "nodes" / n), None, self.store, self.audit,
                                      step_times=lab / "nodes" / n / STEP_TIMES_FILE, straggler_policy=policy)
                       for n in nodes}
        self.seen = 0

    def poll(self) -> list:
        for agent in self.agents.values():
            agent.follow_step_times()
        events = [e for _i, e, _o in self.store.events() if e.kind == FaultKind.STRAGGLER]
        new, self.seen = events[self.seen:], len(events)
        return new

    def straggling(self, node: str) -> bool:
        return "straggler:node" in self.agents[node].conditions.active

    def step(self) -> int:
        """The newest step any rank reported."""
        path = self.lab / "nodes" / self.nodes[0] / STEP_TIMES_FILE
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                last = f.read().splitlines()[-1]
            return json.loads(last)["step"]
        except (OSError, IndexError, ValueError):
            return 0


def _inject_link(node_dir: Path, rail: int, rate: float) -> None:
    """The operator's command, `aidc device inject NODE_DIR link --rail R --rate F`: a real tbf change."""
    done = subprocess.run([sys.executable, "-m", "aidc", "device", "inject", str(node_dir), "link", "--rail", str(rail),
                           "--rate", str(rate)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "agents")))
    if done.returncode != 0:
        raise RuntimeError(f"aidc device inject failed: {(done.stderr or done.stdout).strip()[:300]}")


def slow(mode: str, node_dir: Path, factor: float, rail: int) -> None:
    if mode == "compute":
        sim.inject(node_dir, "slowdown", factor=factor)
    else:  # the fabric's link fault: half the rail's rate
        _inject_link(node_dir, rail, 0.5)


def restore(mode: str, node_dir: Path, rail: int) -> None:
    if mode == "compute":
        sim.inject(node_dir, "slowdown", factor=1.0)
    else:
        _inject_link(node_dir, rail, 1.0)


def wait_steps(fleet: Fleet, job: Job, steps: int, timeout_s: float, poll_s: float = 0.05):
    """Poll the agents for `steps` more training steps; yields (step, new events) each poll."""
    start = fleet.step()
    deadline = time.monotonic() + timeout_s
    while fleet.step() < start + steps:
        if time.monotonic() > deadline or not job.alive():
            raise RuntimeError(f"training stalled or died at step {fleet.step()} (see the node logs)")
        time.sleep(poll_s)
        yield fleet.step(), fleet.poll()


def run(args) -> dict:
    nodes = [f"gpu-{i}" for i in range(args.nodes)]
    policy = StragglerPolicy(window_steps=args.window, tolerance=args.tolerance)
    rng = random.Random(args.seed)
    fab, fabric_tag = None, None
    with tempfile.TemporaryDirectory(prefix="aidc-stragglers-") as tmp:
        lab = Path(tmp)
        for i, n in enumerate(nodes):
            sim.create_node(lab / "nodes" / n, n, 2, i)
        job = fleet = None
        trials, false_positives = [], []
        try:
            if args.mode != "compute":
                from aidc.lab import fabric as lab_fabric

                fab = lab_fabric.bring_up(lab, nodes, rails=args.rails, link_speed_gbps=args.link_gbps,
                                          rail_mbit=args.rail_mbit, say=(lambda m: None) if args.json else print)
                fabric_tag = fab.tag if fab is not None else None
                if fab is None:
                    raise RuntimeError(f"--mode {args.mode} needs the lab's netns fabric, and network namespaces"
                                       " cannot be made here (run as root with CAP_SYS_ADMIN, or use --mode compute)")
            job = Job(lab, nodes, 10_000_000, fab, args.probe_every)
            fleet = Fleet(lab, nodes, policy)
            for _ in wait_steps(fleet, job, 1, timeout_s=120):  # started: torch imported, group formed
                pass
            t0 = time.monotonic()
            for _ in wait_steps(fleet, job, args.window, timeout_s=120):
                pass
            step_s = (time.monotonic() - t0) / args.window
            for trial in range(args.trials):
                for step, events in wait_steps(fleet, job, args.clean_steps, timeout_s=300):
                    false_positives += [{"trial": trial, "node": e.node, "reason": e.message[:200], "phase": "clean", "step": step}
                                        for e in events]
                victim = rng.choice(nodes)
                mode = rng.choice(("compute", "rail")) if args.mode == "mixed" else args.mode
                rail = args.rail if args.rail is not None else rng.randrange(args.rails)
                slow(mode, lab / "nodes" / victim, args.factor, rail)
                injected_at, injected_step = time.monotonic(), fleet.step()
                detected = None
                for step, events in wait_steps(fleet, job, args.max_steps, timeout_s=600):
                    for e in events:
                        if e.node == victim and detected is None:
                            detected = {"s": time.monotonic() - injected_at, "steps": step - injected_step,
                                        "reason": e.message}
                        elif e.node != victim:
                            false_positives.append({"trial": trial, "node": e.node, "reason": e.message[:200], "phase": "slowed",
                                                    "victim": victim, "step": step})
                    if detected:
                        break
                restore(mode, lab / "nodes" / victim, rail)
                for step, events in wait_steps(fleet, job, args.max_steps, timeout_s=600):
                    false_positives += [{"trial": trial, "node": e.node, "reason": e.message[:200], "phase": "recovering", "step": step}
                                        for e in events]
                    if not fleet.straggling(victim):
                        break
                trials.append({"trial": trial, "victim": victim, "mode": mode,
                               "rail": rail if mode == "rail" else None, "detected": detected is not None,
                               "detect_s": round(detected["s"], 2) if detected else None,
                               "detect_steps": detected["steps"] if detected else None,
                               "reason": detected["reason"][:200] if detected else None})
                if not args.json:
                    print(f"trial {trial + 1}/{args.trials}: {victim} {f'rail {rail}' if mode == 'rail' else mode} "
                          + (f"detected after {detected['steps']} steps ({detected['s']:.1f} s)" if detected
                             else "NOT detected"), flush=True)
        finally:  # Ctrl-C and errors too: no process, no namespace stays behind
            if job is not None:
                job.stop()
            if fleet is not None:
                for a in fleet.agents.values():
                    a.close()
                fleet.store.close()
                fleet.audit.close()
            if fab is not None:
                lab_fabric.teardown(lab)
    found = [t for t in trials if t["detected"]]
    return {
        "mode": args.mode, "factor": args.factor if args.mode != "rail" else None,
        "rail_rate": 0.5 if args.mode != "compute" else None, "rails": args.rails if args.mode != "compute" else None,
        "rail_mbit": args.rail_mbit if args.mode != "compute" else None,
        "probe_every": args.probe_every if args.mode != "compute" else None, "fabric_tag": fabric_tag, "nodes": args.nodes, "trials": len(trials),
        "window_steps": args.window, "tolerance": args.tolerance, "step_s": round(step_s, 4),
        "recall": round(len(found) / len(trials), 3) if trials else 0.0,
        "false_positives": len(false_positives), "false_positive_events": false_positives,
        "detect_s_p50": round(statistics.median(t["detect_s"] for t in found), 2) if found else None,
        "detect_s_max": max((t["detect_s"] for t in found), default=None),
        "detect_steps_p50": statistics.median(t["detect_steps"] for t in found) if found else None,
        "detect_steps_max": max((t["detect_steps"] for t in found), default=None),
        "by_mode": {m: {"trials": sum(t["mode"] == m for t in trials),
                        "detected": sum(t["mode"] == m and t["detected"] for t in trials),
                        "detect_s_p50": round(statistics.median(v), 2) if (v := [t["detect_s"] for t in found
                                                                                 if t["mode"] == m]) else None}
                    for m in sorted({t["mode"] for t in trials})},
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "per_trial": trials,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--mode", choices=("mixed", "compute", "rail"), default="mixed",
                    help="what slows the victim: mixed (compute or a rail, drawn per trial; needs network"
                         " namespaces, as rail does), compute (its simulated GPU) or rail (one rail at half rate)")
    ap.add_argument("--factor", type=float, default=1.1, help="compute mode: slowdown factor (1.1 = 10%% slower)")
    ap.add_argument("--rail", type=int, default=None, help="rail mode: which rail to cut to half rate (default: random)")
    ap.add_argument("--rails", type=int, default=2, help="rail mode: rails of the fabric")
    ap.add_argument("--rail-mbit", type=float, default=200, help="rail mode: a healthy rail's shaped rate")
    ap.add_argument("--link-gbps", type=float, default=400, help="rail mode: the spec's link speed (for the scale)")
    ap.add_argument("--probe-every", type=int, default=5, help="rail mode: the trainer's link probe every N steps")
    ap.add_argument("--window", type=int, default=StragglerPolicy().window_steps)
    ap.add_argument("--tolerance", type=float, default=StragglerPolicy().tolerance)
    ap.add_argument("--clean-steps", type=int, default=40, help="steps without a slowdown before each trial")
    ap.add_argument("--max-steps", type=int, default=200, help="steps to wait for a detection (and a clearance)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.trials < 1 or args.nodes < 3 or args.factor <= 1.0:
        ap.error("needs --trials >= 1, --nodes >= 3 (a median needs a fleet) and --factor > 1")
    if args.rails < 1 or args.probe_every < 1 or (args.rail is not None and not 0 <= args.rail < args.rails):
        ap.error("needs --rails >= 1, --probe-every >= 1 and 0 <= --rail < --rails")
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the finally clauses stop the ranks and
    # remove the fabric's namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    except RuntimeError as exc:
        print(f"aidc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the ranks are stopped and the fabric removed (run's finally)
        print("aidc: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"recall {result['recall']}, false positives {result['false_positives']}, detect p50 "
              f"{result['detect_s_p50']} s / {result['detect_steps_p50']} steps (step {result['step_s'] * 1000:.1f} ms,"
              f" load {result['load_avg']})")
    return 0 if result["recall"] == 1.0 and result["false_positives"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
