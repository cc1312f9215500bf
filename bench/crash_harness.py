#!/usr/bin/env python3
"""Crash harness: kill -9 the failover controller, the runbook receiver and node agents at
random moments under a stream of faults and alerts, restart them, and count what was lost
or repeated.

    .venv/bin/python bench/crash_harness.py --kills 100 --json [--seed S] [--workdir DIR]

What runs (real processes, the lab's sim backend, all on loopback): `aidc failover run`,
`aidc runbook serve` and one `aidc agent run` per fault node, sharing one lab directory,
event store and audit log. Faults are XIDs injected into the simulated nodes (kernel log
and NVML event), each a distinct (node, GPU, XID) so it can be traced; alerts are
Alertmanager-style POSTs, each with its own fingerprint, retried until the receiver takes
them, as Alertmanager does. An operator thread releases quarantined fault nodes so that
quarantines keep coming. After the last kill the harness waits for everything to settle,
stops the processes and compares what was injected with the stores and the audit log:

* lost_events: faults with no handled event in the store, plus alerts with no run.
* repeated_destructive_actions: scheduler calls (the lab scheduler's journal) that
  quarantined a node already quarantined or released one already in service.
* lost_audit_records: store and run-state changes with no audit record (by stage).
* audit_verified: the hash chain and anchor verify.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agents"))

import yaml  # noqa: E402

from aidc import polling  # noqa: E402
from aidc.audit.log import AuditLog  # noqa: E402
from aidc.device import sim  # noqa: E402
from aidc.health.kmsg import normalize_pci  # noqa: E402
from aidc.runbook.state import ACTIVE, RunState  # noqa: E402
from aidc.store import Store  # noqa: E402

FAULT_NODES = ["gpu-0", "gpu-1"]  # have agents; failover quarantines them
ALERT_NODES = ["gpu-2", "gpu-3", "gpu-4", "gpu-5"]  # runbook runs quarantine and release them
GPUS = 8
XIDS = [13, 31, 43, 48, 62, 63, 74, 79, 94, 95, 109, 119]  # restart_app, ignore, reset_gpu, reboot_node, ...
TOKEN = "crash-harness-token"
SETTLE_TIMEOUT_S = 240.0

RUNBOOK = """\
name: crash-drill
title: Crash drill
summary: Quarantine the node, hold, tell on-call, release (policy approves both).
trigger: {alerts: [{alertname: CrashDrill}]}
cooldown_s: 0
guards: [{guard: blast_radius}]
steps:
  - {id: out, kind: quarantine, reason: "crash drill"}
  - {id: hold, kind: wait, seconds: 0.3}
  - {id: tell, kind: notify, message: "${node} drilled"}
  - {id: back, kind: release, reason: "crash drill over"}
"""


def write_stack(path: Path) -> None:
    doc = yaml.safe_load((ROOT / "Pulumi.lab.yaml").read_text())
    cluster = doc["config"]["aidc:cluster"]
    cluster["name"] = "crash"
    cluster["node_pools"] = [{"name": "gpu", "count": len(FAULT_NODES) + len(ALERT_NODES), "gpu_model": "SIM",
                              "gpus_per_node": GPUS, "spares": 0}]
    # The harness quarantines and releases every few seconds on purpose: the circuit breaker
    # (policy.breaker) and the hand-over of often-remediated nodes to a person
    # (policy.escalation.node_remediations) would rightly stop that, so both are out of reach here.
    cluster["policy"].update(max_unavailable=4, runbook_auto_approve=["quarantine", "release"],
                             breaker={"max_quarantines": 50000}, escalation={"node_remediations": 1000})
    path.write_text(yaml.safe_dump(doc))


class Proc:
    """One of the harness's processes, in its own process group, restartable."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict):
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, cwd=self.log.parent)
        self.started = time.monotonic()

    def kill9(self) -> float:
        up = time.monotonic() - self.started
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        return up

    def stop(self) -> None:
        if self.proc:
            polling.stop_process_group(self.proc, timeout_s=15)


class Alerts:
    """Alertmanager's side: send each alert until the receiver has taken it."""

    def __init__(self, url: str):
        self.url = url
        self.pending: list[dict] = []
        self.taken: dict[str, str] = {}  # fingerprint -> outcome
        self.sent = 0
        self.lock = threading.Lock()

    def add(self, node: str, n: int) -> None:
        alert = {"status": "firing", "labels": {"alertname": "CrashDrill", "Hostname": node},
                 "annotations": {}, "startsAt": f"2026-01-01T00:00:{n:02d}Z" if n < 60 else f"t{n}",
                 "fingerprint": f"drill-{n}"}
        with self.lock:
            self.pending.append(alert)
            self.sent += 1

    def deliver(self) -> None:
        with self.lock:
            batch = list(self.pending)
        for alert in batch:
            body = json.dumps({"version": "4", "status": "firing", "alerts": [alert]}).encode()
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=3) as resp:
                    [result] = json.loads(resp.read())["results"]
            except (OSError, ValueError):  # receiver down or killed mid-request: retry later
                return
            if result["outcome"] == "node_busy":
                continue  # Alertmanager's next repeat
            with self.lock:
                self.pending.remove(alert)
                self.taken[alert["fingerprint"]] = result["outcome"]


def operator_release(stack: Path, lab: Path) -> int:
    """Return quarantined fault nodes to service, as an operator would after a repair."""
    from aidc.failover.controller import FailoverController
    from aidc.lab.cluster import lab_scheduler
    from aidc.spec import load_stack

    store, audit = Store(lab / "state.db"), AuditLog(lab / "audit.db")
    try:
        ctl = FailoverController(load_stack(stack), store, audit, lab_scheduler(lab), actor="crash-harness")
        released = 0
        for node in store.nodes_in_state("quarantined"):
            if node in FAULT_NODES:
                ctl.release(node, "crash harness: repaired", actor="crash-harness")
                released += 1
        return released
    finally:
        store.close()
        audit.close()


def _handled(store: Store) -> set[tuple[str, str, int]]:
    """(node, PCI address, XID) of every handled event: the GPU index is not always known
    (a kernel line read before the restarted agent has seen that GPU's telemetry)."""
    return {(e.node, normalize_pci(e.pci), e.xid) for _, e, outcome in store.events() if outcome and e.pci}


def settled(lab: Path, work: Path, alerts: Alerts, injected: set) -> bool:
    with alerts.lock:
        if alerts.pending:
            return False
    store = Store(lab / "state.db")
    runs = RunState(work / "runbook.db")
    try:
        handled = _handled(store)
        return (not store.pending() and not store.nodes_in_state("quarantining")
                and injected <= handled and not runs.runs(status=ACTIVE))
    finally:
        store.close()
        runs.close()


def measure(lab: Path, work: Path, alerts: Alerts, injected: set) -> dict:
    store, runs = Store(lab / "state.db"), RunState(work / "runbook.db")
    audit = AuditLog(lab / "audit.db", read_only=True)
    try:
        events = store.events()
        handled = _handled(store)
        lost_faults = sorted(injected - handled)
        all_runs = runs.runs()
        # An alert either started a run or joined the node's active run (the engine's dedupe);
        # both are recorded as seen, with the run that handles it.
        run_ids = {r.id for r in all_runs}
        handled_alerts = {fp for fp, run_id in runs.db.execute("SELECT fingerprint, run_id FROM alerts_seen")
                          if run_id in run_ids}
        lost_alerts = sorted(set(alerts.taken) - handled_alerts) + [a["fingerprint"] for a in alerts.pending]

        lost = {"agent": [], "failover": [], "runbook": []}
        for event_id, event, outcome in events:
            # The node too: a record of an event whose commit a kill prevented names an id
            # that another agent's event may take next.
            if not any(r.node == event.node for r in audit.find("health.fault", event_id=event_id)):
                lost["agent"].append(f"event {event_id} ({event.node} XID {event.xid})")
            if outcome and not audit.find("failover.decision", event_id=event_id, verdict=outcome):
                lost["failover"].append(f"event {event_id} decision {outcome}")
            if outcome == "quarantine" and not audit.find("failover.action", event_id=event_id):
                lost["failover"].append(f"event {event_id} quarantine action")
        for run in all_runs:
            if not audit.find("runbook.run.started", run_id=run.id):
                lost["runbook"].append(f"run {run.id} started")
            if run.status in ("done", "failed") and not audit.find("runbook.run.finished", run_id=run.id):
                lost["runbook"].append(f"run {run.id} finished")
            for step in runs.steps(run.id):
                if step.status in ("done", "failed") and not audit.find(
                        "runbook.step", run_id=run.id, idx=step.idx, status=step.status):
                    lost["runbook"].append(f"run {run.id} step {step.step_id} {step.status}")

        calls, repeated = 0, []
        for node_dir in sorted((lab / "nodes").iterdir()):
            journal = node_dir / "scheduler.jsonl"
            for line in journal.read_text().splitlines() if journal.exists() else []:
                entry = json.loads(line)
                calls += 1
                if (entry["op"], entry["was"]) in (("quarantine", "quarantined"), ("release", "in_service")):
                    repeated.append(f"{node_dir.name}: {entry['op']} ({entry['reason']}) of a node already "
                                    f"{entry['was']}")
        records = audit.records()
        verified = audit.verify()
        return {
            "faults_injected": len(injected), "alerts_sent": alerts.sent, "store_events": len(events),
            "runbook_runs": len(all_runs),
            "runs_by_status": {s: sum(1 for r in all_runs if r.status == s) for s in sorted({r.status for r in all_runs})},
            "scheduler_calls": calls,
            "lost_events": len(lost_faults) + len(lost_alerts),
            "repeated_destructive_actions": len(repeated),
            "lost_audit_records": sum(len(v) for v in lost.values()),
            "lost_audit_records_by_stage": {k: len(v) for k, v in lost.items()},
            "recovered_audit_records": sum(1 for r in records if r.payload.get("recovered")),
            "unfinished_runs": sum(1 for r in all_runs if r.status in ACTIVE),
            "audit_records": len(records),
            "audit_verified": verified.ok,
            "details": {"lost_faults": [list(k) for k in lost_faults], "lost_alerts": lost_alerts,
                        "repeated": repeated, "lost_audit_records": lost,
                        **({} if verified.ok else {"audit_problem": verified.problem})},
        }
    finally:
        store.close()
        runs.close()
        audit.close()


def run(kills: int, seed: int, work: Path) -> dict:
    rng = random.Random(seed)
    lab = work / "lab"
    for i, node in enumerate(FAULT_NODES + ALERT_NODES):
        sim.create_node(lab / "nodes" / node, node, GPUS, i)
    stack = work / "Pulumi.crash.yaml"
    write_stack(stack)
    (work / "runbooks").mkdir()
    (work / "runbooks" / "crash-drill.yaml").write_text(RUNBOOK)
    (work / "token").write_text(TOKEN)
    (work / "logs").mkdir()
    from aidc.polling import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "agents") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    aidc = [sys.executable, "-m", "aidc"]
    procs = {
        "failover": Proc("failover", aidc + ["failover", "run", "--stack", str(stack), "--state-dir", str(lab),
                                             "--poll-interval", "0.05"], work / "logs" / "failover.log", env),
        "receiver": Proc("receiver", aidc + [
            "runbook", "serve", "--listen-address", f"127.0.0.1:{port}", "--token-file", str(work / "token"), "--stack", str(stack),
            "--state-dir", str(lab), "--state-db", str(work / "runbook.db"), "--audit-db", str(lab / "audit.db"),
            "--runbooks", str(work / "runbooks"), "--notify-file", str(work / "notify.jsonl")],
            work / "logs" / "receiver.log", env),
    }
    for node in FAULT_NODES:
        procs[f"agent:{node}"] = Proc(f"agent:{node}", aidc + [
            "agent", "run", "--node", node, "--backend", "sim", "--node-dir", str(lab / "nodes" / node),
            "--store", str(lab / "state.db"), "--audit-db", str(lab / "audit.db"), "--port", "0",
            "--poll-interval", "0.05"], work / "logs" / f"agent-{node}.log", env)

    keys = [(node, gpu, xid) for node in FAULT_NODES for gpu in range(GPUS) for xid in XIDS]
    rng.shuffle(keys)
    faults = keys[:min(len(keys), 2 * kills + 4)]
    n_alerts = max(4, kills // 2)
    span = max(6.0, 0.6 * kills)  # seconds over which kills, faults and alerts are spread
    schedule = sorted([(rng.uniform(0.5, span), "kill", None) for _ in range(kills)]
                      + [(rng.uniform(0, span), "fault", f) for f in faults]
                      + [(rng.uniform(0, span), "alert", i) for i in range(n_alerts)], key=lambda x: x[0])

    alerts = Alerts(f"http://127.0.0.1:{port}/alerts")
    stop = threading.Event()
    releases = [0]

    def operator() -> None:  # Alertmanager's retries and an operator's releases
        while not stop.wait(0.3):
            alerts.deliver()
            releases[0] += operator_release(stack, lab)

    kills_by, kill_uptimes, injected = {}, [], set()
    t0 = time.monotonic()
    for p in procs.values():
        p.start()
    helper = threading.Thread(target=operator, name="operator", daemon=True)
    helper.start()
    try:
        for at, what, arg in schedule:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if what == "fault":
                node, gpu, xid = arg
                done = sim.inject(lab / "nodes" / node, "xid", gpu, xid=xid)
                injected.add((node, normalize_pci(done["pci"]), xid))
            elif what == "alert":
                alerts.add(ALERT_NODES[arg % len(ALERT_NODES)], arg)
            else:
                kind = rng.choice(["failover", "receiver", "agent"])
                victim = procs[f"agent:{rng.choice(FAULT_NODES)}" if kind == "agent" else kind]
                kill_uptimes.append(victim.kill9())
                kills_by[victim.name] = kills_by.get(victim.name, 0) + 1
                victim.start()
        injected_by = time.monotonic() - t0
        settle_started = time.monotonic()
        is_settled = _wait_settled(lab, work, alerts, injected)
        settle_s = time.monotonic() - settle_started
    finally:
        stop.set()
        helper.join(timeout=30)
        for p in procs.values():
            p.stop()
    figures = measure(lab, work, alerts, injected)
    return {"kills": sum(kills_by.values()), "kills_by_process": kills_by, "seed": seed,
            "median_uptime_at_kill_s": round(sorted(kill_uptimes)[len(kill_uptimes) // 2], 2) if kill_uptimes else None,
            "operator_releases": releases[0], "settled": is_settled,
            "inject_phase_s": round(injected_by, 1), "settle_s": round(settle_s, 1),
            "duration_s": round(time.monotonic() - t0, 1), **figures}


def _wait_settled(lab: Path, work: Path, alerts: Alerts, injected: set) -> bool:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        if settled(lab, work, alerts, injected):
            return True
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=100, help="kill -9s to deliver (default 100)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time-based, printed)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the lab here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.kills < 0:
        p.error("--kills must be >= 0")
    seed = args.seed if args.seed is not None else int(time.time())
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=False)
        figures = run(args.kills, seed, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="aidc-crash-") as tmp:
            figures = run(args.kills, seed, Path(tmp))
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        for key in ("kills", "kills_by_process", "lost_events", "repeated_destructive_actions", "lost_audit_records",
                    "audit_verified", "duration_s"):
            print(f"{key}: {figures[key]}")
    ok = (figures["settled"] and figures["audit_verified"] and not figures["lost_events"]
          and not figures["repeated_destructive_actions"] and not figures["lost_audit_records"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
