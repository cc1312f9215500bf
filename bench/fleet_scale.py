"""The failover controller at fleet scale: N simulated nodes reporting faults to one real controller.

What runs, as on a cluster:
* the controller: `aidc failover run --listen` (its own process; HTTPS with mutual TLS, the
  event store, the decision loop, the audit log), with `--state postgres` on a PostgreSQL this
  bench starts privately (aidc.lab.postgres_server) unless `--dsn` names one;
* the fleet: `--generators` processes, each playing some racks. A rack's relay holds a client
  certificate named `rack-K` and may report only for the nodes the stack file lists for it
  (`transport.relays`, `--allow-client rack-K`), so a node still speaks only for itself. Each
  node raises faults at `--rate` per second (XID 43, "GPU stopped processing", whose action
  keeps the node in service); the relay sends them in batches (`aidc.transport.wire`, at most
  wire.MAX_BATCH a request) and sends a batch again until the controller answers 200;
* the scheduler: a double holding the N nodes (registered under the stack's scheduler name in
  the controller's process only), which counts its API requests and its own CPU time, reported
  apart from the controller's;
* `--storm F`: F x N distinct nodes raise XID 79 (fallen off the bus: reboot_node, out of
  service) at random moments within the first 30 s (or the run, if shorter). `policy.max_unavailable`
  is 1% of the fleet, so most of them are refused for blast radius: a refusal is a decision.

Measured: `decision_ms` from the event's creation on the node (`observed_at`) to the controller's
audited decision (quarantine or refusal); `lost`, events generated but never decided after the
drain (`--drain-s`); controller RSS (peak) and CPU from /proc; the generators' CPU from their own
clocks; the store's and audit log's bytes on disk per million events. No figure here is asserted
by a test: tests/test_fleet_scale_bench.py checks the fields and that nothing is lost.

Usage: python bench/fleet_scale.py --nodes N [--rate 0.1] [--duration 30] [--storm 0.1]
                                   [--state sqlite|postgres] [--dsn DSN] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agents"))
sys.path.insert(0, str(ROOT / "tests" / "runbook"))  # the tests' throwaway CA

from aidc import polling  # noqa: E402
from aidc.events import Action, FaultEvent, FaultKind  # noqa: E402
from aidc.transport import wire  # noqa: E402

POOL = "gpu"
QUIET_XID, STORM_XID = 43, 79
STORM_WINDOW_S = 30.0
TICK_S = 0.1  # a relay gathers its nodes' events this long before it sends them


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --- the stack file -------------------------------------------------------------------------------
def racks(nodes: int, rack_size: int) -> list[tuple[str, int, int]]:
    """(relay name, first node index, last node index) per rack."""
    return [(f"rack-{r}", first, min(nodes, first + rack_size) - 1)
            for r, first in enumerate(range(0, nodes, rack_size))]


def stack_text(nodes: int, rack_list: list[tuple[str, int, int]], state: str, dsn: str | None) -> str:
    relays = "\n".join(f"        {name}: ['{POOL}-[{first}-{last}]']" for name, first, last in rack_list)
    state_yaml = f"    state: {{backend: postgres, dsn: '{dsn}'}}\n" if state == "postgres" else ""
    return f"""# Written by bench/fleet_scale.py for one run.
config:
  aidc:cluster:
    name: fleet-scale
    device_backend: sim
    scheduler: lab
    node_pools:
      - {{name: {POOL}, count: {nodes}, gpu_model: SIM, gpus_per_node: 8}}
    policy:
      dry_run: false
      max_unavailable: "1%"
    transport:
      relays:
{relays}
{state_yaml}"""


# --- the scheduler double (in the controller's process) --------------------------------------------
class CountingScheduler:
    """Holds the spec's nodes in memory; every call is one API request, counted, its CPU timed."""

    name = "fleet-double"

    def __init__(self, spec, stats_path: Path):
        self.nodes = frozenset(n.name for n in spec.nodes())
        self.out: set[str] = set()
        self.requests: dict[str, int] = {}
        self.cpu_s = 0.0
        self.stats_path = stats_path
        self._lock = threading.Lock()

    def _count(self, what: str) -> float:
        with self._lock:
            self.requests[what] = self.requests.get(what, 0) + 1
        return time.thread_time()

    def _spent(self, started: float) -> None:
        with self._lock:
            self.cpu_s += time.thread_time() - started

    def known_nodes(self) -> set[str]:
        started = self._count("list_nodes")
        names = set(self.nodes)
        self._spent(started)
        return names

    def quarantine(self, node: str, reason: str, event: str | None = None) -> str | None:
        started = self._count("quarantine")
        if node not in self.nodes:
            raise KeyError(f"no node {node!r}")
        self.out.add(node)
        self._spent(started)
        return None

    def release(self, node: str, reason: str) -> None:
        started = self._count("release")
        self.out.discard(node)
        self._spent(started)

    def state(self, node: str) -> str:
        started = self._count("state")
        self._spent(started)
        return "quarantined" if node in self.out else "in_service"

    def write_stats(self) -> None:
        with self._lock:
            self.stats_path.write_text(json.dumps({"requests": self.requests, "cpu_s": self.cpu_s,
                                                   "out_of_service": len(self.out)}))


def run_controller(argv: list[str], stats_path: Path) -> None:
    """`aidc failover run ...` with the scheduler double registered for this process."""
    import atexit

    from aidc.cli.main import main
    from aidc.failover import backends

    made: list[CountingScheduler] = []

    def open_double(spec, lab_dir, audit, actor, tell_rendezvous):
        made.append(CountingScheduler(spec, stats_path))
        return made[-1]

    backends.BACKENDS["lab"] = open_double
    atexit.register(lambda: [s.write_stats() for s in made])
    sys.argv = ["aidc", *argv]
    main()


# --- the fleet (generator processes) ---------------------------------------------------------------
class Relay(threading.Thread):
    """One rack: makes its nodes' events at their rate and sends them to the controller."""

    def __init__(self, cfg: dict, rack: dict, store_id: str, deadline: float):
        super().__init__(name=rack["name"], daemon=True)
        self.cfg, self.rack, self.store_id, self.deadline = cfg, rack, store_id, deadline
        self.nodes = [f"{POOL}-{i}" for i in range(rack["first"], rack["last"] + 1)]
        self.rate = cfg["rate"] * len(self.nodes)  # events per second for the whole rack
        self.storm = sorted(rack["storm"])  # (offset s, node index)
        self.made = self.acked = self.requests = self.failed_requests = 0
        self.seq = 0
        ctx = ssl.create_default_context(cafile=cfg["ca"])
        ctx.load_cert_chain(rack["cert"], rack["key"])
        self.ctx = ctx
        self.conn: http.client.HTTPSConnection | None = None
        self.rng = random.Random(rack["first"])

    def event(self, node: str, xid: int, action: Action, now: float) -> tuple[str, FaultEvent]:
        self.seq += 1
        gpu = self.rng.randrange(8)
        line = f"NVRM: Xid (PCI:0000:{gpu + 16:02x}:00): {xid}, pid=1234, name=train, bench fleet_scale"
        return (f"{node}:{self.store_id}:{self.seq}",
                FaultEvent(node, FaultKind.XID, action, f"XID {xid} on gpu {gpu}", "kmsg", gpu=gpu,
                           pci=f"0000:{gpu + 16:02x}:00.0", xid=xid, line=line, observed_at=now))

    def post(self, body: bytes) -> bool:
        host, port = self.cfg["host"], self.cfg["port"]
        try:
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(host, port, timeout=30, context=self.ctx)
            self.requests += 1
            self.conn.request("POST", wire.PATH, body=body, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            resp.read()
            if resp.status == 200:
                return True
            print(f"{self.name}: controller answered {resp.status}", file=sys.stderr)
        except (OSError, http.client.HTTPException) as exc:
            print(f"{self.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if self.conn is not None:
                self.conn.close()
            self.conn = None
        self.failed_requests += 1
        return False

    def send(self, queue: list) -> None:
        while queue and time.time() < self.deadline:
            batch = queue[:wire.MAX_BATCH]
            if self.post(wire.encode(batch)):
                del queue[:len(batch)]
                self.acked += len(batch)
            else:
                time.sleep(0.2)  # the same batch again: the controller keeps events by key

    def run(self) -> None:
        start, duration = self.cfg["start"], self.cfg["duration"]
        while time.time() < start:
            time.sleep(min(0.05, start - time.time()))
        queue: list = []
        next_storm = 0
        while True:
            now = time.time()
            elapsed = min(now - start, duration)
            due = int(self.rate * elapsed) - (self.made - next_storm)
            for _ in range(max(0, due)):
                queue.append(self.event(self.rng.choice(self.nodes), QUIET_XID, Action.IGNORE, now))
                self.made += 1
            while next_storm < len(self.storm) and self.storm[next_storm][0] <= elapsed:
                node = f"{POOL}-{self.storm[next_storm][1]}"
                queue.append(self.event(node, STORM_XID, Action.REBOOT_NODE, now))
                self.made += 1
                next_storm += 1
            self.send(queue)
            if elapsed >= duration:
                break
            time.sleep(max(0.0, TICK_S - (time.time() - now)))
        self.unsent = len(queue)
        if self.conn is not None:
            self.conn.close()


def run_generator(cfg: dict) -> None:
    store_id = uuid.uuid4().hex  # the keys' store id: one simulated outbox per process
    deadline = cfg["start"] + cfg["duration"] + cfg["drain_s"]
    relays = [Relay(cfg, rack, store_id, deadline) for rack in cfg["racks"]]
    for r in relays:
        r.start()
    for r in relays:
        r.join(timeout=max(1.0, deadline - time.time() + 5))
    times = os.times()
    print(json.dumps({"made": sum(r.made for r in relays), "acked": sum(r.acked for r in relays),
                      "requests": sum(r.requests for r in relays),
                      "failed_requests": sum(r.failed_requests for r in relays),
                      "cpu_s": times.user + times.system}), flush=True)


# --- measuring ---------------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sqlite_bytes(db: Path) -> int:
    """The database's size once its write-ahead log is folded in (the WAL's preallocated pages
    and the shared-memory index are not stored data)."""
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


class SqliteState:
    def __init__(self, lab: Path):
        self.lab = lab

    def count_decided(self) -> int:
        with sqlite3.connect(f"file:{self.lab / 'state.db'}?mode=ro", uri=True, timeout=30) as db:
            return db.execute("SELECT count(*) FROM events WHERE outcome IS NOT NULL").fetchone()[0]

    def bytes_on_disk(self) -> int:
        return sqlite_bytes(self.lab / "state.db")


class PostgresState:
    def __init__(self, dsn: str):
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)

    def count_decided(self) -> int:
        return self.conn.execute("SELECT count(*) FROM events WHERE outcome IS NOT NULL").fetchone()[0]

    def bytes_on_disk(self) -> int:
        return self.conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def decisions(audit_db: Path) -> list[tuple[float, float, str, int | None]]:
    """(decided at, observed at, verdict, xid) of each event's first audited decision."""
    with sqlite3.connect(f"file:{audit_db}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute(
            "SELECT min(ts), json_extract(payload, '$.observed_at'), json_extract(payload, '$.verdict'), "
            "json_extract(payload, '$.xid') FROM audit WHERE kind = 'failover.decision' "
            "GROUP BY json_extract(payload, '$.event_id')").fetchall()
    return [r for r in rows if r[1] is not None]


def received_to_decided_ms(audit_db: Path) -> list[float]:
    """Per event, the controller's own part: its listener's `transport.received` record -> its
    first decision record (the same node and observed_at name the same event)."""
    with sqlite3.connect(f"file:{audit_db}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute("SELECT kind, node, ts, json_extract(payload, '$.observed_at') FROM audit "
                          "WHERE kind IN ('transport.received', 'failover.decision') ORDER BY seq").fetchall()
    received: dict[tuple, float] = {}
    out = []
    for kind, node, ts, observed in rows:
        if kind == "transport.received":
            received.setdefault((node, observed), ts)
        elif (node, observed) in received:
            out.append((ts - received.pop((node, observed))) * 1000)
    return out


def breaker_state(stack: Path, lab: Path, state_store) -> dict:
    from aidc.audit.log import AuditLog
    from aidc.failover.remediation import RemediationGate
    from aidc.spec import load_stack

    audit = AuditLog(lab / "audit.db")
    try:
        return dict(RemediationGate(load_stack(stack), state_store, audit).breaker())
    finally:
        audit.close()


# --- the run -----------------------------------------------------------------------------------------
def start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def run(args) -> dict:
    from certs import CA

    from aidc.lab import postgres_server

    tmp = Path(tempfile.mkdtemp(prefix="aidc-fleet-"))
    os.chmod(tmp, 0o755)  # a private PostgreSQL's files live under it, as the postgres user
    procs: list[subprocess.Popen] = []
    pg = None
    try:
        dsn = args.dsn
        if args.state == "postgres" and dsn is None:
            reason = postgres_server.unavailable_reason()
            if reason:
                raise SystemExit(f"--state postgres: {reason}")
            pg = postgres_server.LocalPostgres(tmp / "pg", port=polling.free_port())
            pg.start()
            dsn = pg.dsn
        rack_list = racks(args.nodes, args.rack_size)
        ca = CA.create(tmp / "pki", "fleet-ca")
        server = ca.issue(tmp / "pki", "controller", server=True)
        rng = random.Random(args.seed)
        storm_nodes = rng.sample(range(args.nodes), round(args.storm * args.nodes)) if args.storm else []
        storm_window = min(STORM_WINDOW_S, args.duration)
        storm_at = {n: rng.uniform(0, storm_window) for n in storm_nodes}
        stack = tmp / "Pulumi.fleet.yaml"
        stack.write_text(stack_text(args.nodes, rack_list, args.state, dsn))
        lab, port, stats = tmp / "lab", polling.free_port(), tmp / "scheduler.json"
        lab.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "agents"), "AIDC_ROOT": str(tmp)}
        ctl_argv = ["failover", "run", "--stack", str(stack), "--lab-dir", str(lab), "--no-dry-run",
                    "--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                    "--client-ca", str(ca.cert_file)]
        for name, _, _ in rack_list:
            ctl_argv += ["--allow-client", name]
        controller = start([__file__, "--role", "controller", "--stats", str(stats), "--", *ctl_argv],
                           tmp / "controller.log", env)
        procs.append(controller)
        polling.wait_for("the controller's listener", lambda: controller.poll() is not None or
                         "receiving fault events" in (tmp / "controller.log").read_text(), 300)
        if controller.poll() is not None:
            raise SystemExit("the controller stopped:\n" + (tmp / "controller.log").read_text()[-3000:])
        state = SqliteState(lab) if args.state == "sqlite" else PostgresState(dsn)
        # What an empty store takes (PostgreSQL's catalog: megabytes) is not the events'.
        empty_bytes = state.bytes_on_disk() if args.state == "postgres" else 0
        # Racks to generator processes, round robin; each rack's certificate is its relay's.
        rack_cfgs = []
        for name, first, last in rack_list:
            issued = ca.issue(tmp / "pki", name, server=False)
            rack_cfgs.append({"name": name, "first": first, "last": last, "cert": str(issued.cert),
                              "key": str(issued.key),
                              "storm": [(at, n) for n, at in storm_at.items() if first <= n <= last]})
        t0 = time.time() + 1.0 + 0.2 * args.generators  # every generator started and connected by then
        gens = []
        for g in range(args.generators):
            mine = rack_cfgs[g::args.generators]
            if not mine:
                continue
            cfg = {"host": "127.0.0.1", "port": port, "ca": str(ca.cert_file), "rate": args.rate,
                   "duration": args.duration, "drain_s": args.drain_s, "start": t0, "racks": mine}
            cfg_path = tmp / f"generator-{g}.json"
            cfg_path.write_text(json.dumps(cfg))
            gens.append(subprocess.Popen([sys.executable, __file__, "--role", "generator", "--config", str(cfg_path)],
                                         stdout=subprocess.PIPE, stderr=open(tmp / f"generator-{g}.log", "w"),
                                         env=env, text=True, start_new_session=True))
        procs += gens
        while time.time() < t0:
            time.sleep(0.05)
        cpu0, wall0 = proc_cpu_s(controller.pid), time.monotonic()
        outputs = []
        for gen in gens:
            out, _ = gen.communicate(timeout=args.duration + args.drain_s + 60)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            outputs.append(json.loads(lines[-1]) if lines else {"made": 0, "acked": 0, "requests": 0,
                                                                "failed_requests": 0, "cpu_s": 0.0})
        made = sum(o["made"] for o in outputs)
        drain_until = time.monotonic() + args.drain_s
        while state.count_decided() < made and time.monotonic() < drain_until and controller.poll() is None:
            time.sleep(0.2)
        decided_n = state.count_decided()
        cpu1, wall1 = proc_cpu_s(controller.pid), time.monotonic()
        rss = proc_rss_peak_mb(controller.pid)
        controller.send_signal(signal.SIGTERM)
        controller.wait(timeout=120)
        rows = decisions(lab / "audit.db")
        latencies = [(at - observed) * 1000 for at, observed, _, _ in rows]
        in_controller = received_to_decided_ms(lab / "audit.db")
        storm_rows = [r for r in rows if r[3] == STORM_XID]
        sched = json.loads(stats.read_text()) if stats.exists() else {"requests": {}, "cpu_s": None}
        store_bytes = state.bytes_on_disk() - empty_bytes + sqlite_bytes(lab / "audit.db")
        first_seen = min((r[1] for r in rows), default=t0)
        last_decided = max((r[0] for r in rows), default=t0)
        result = {
            "nodes": args.nodes, "state": args.state, "racks": len(rack_list), "generators": len(gens),
            "duration_s": args.duration, "rate_per_node": args.rate,
            "offered_events_per_s": round(made / args.duration, 1),
            "handled_events_per_s": round(len(rows) / max(1e-9, last_decided - min(first_seen, t0)), 1),
            "events": made, "acked": sum(o["acked"] for o in outputs), "decided": decided_n, "lost": made - decided_n,
            "decision_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
            "decision_ms_p99": round(pct(latencies, 0.99), 1) if latencies else None,
            "decision_ms_max": round(max(latencies), 1) if latencies else None,
            # received by the listener -> decided (the relay's TICK_S gathering and the request
            # are left out)
            "controller_ms_p50": round(statistics.median(in_controller), 1) if in_controller else None,
            "controller_ms_p99": round(pct(in_controller, 0.99), 1) if in_controller else None,
            "controller_rss_mb": round(rss, 1),
            "controller_cpu_pct": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
            "generator_cpu_pct": round(100 * sum(o["cpu_s"] for o in outputs) / (wall1 - wall0), 1),
            "wall_s": round(wall1 - wall0, 1),
            "store_bytes_per_million_events": round(store_bytes / max(1, made) * 1e6),
            "api_requests_per_event": round(sum(sched["requests"].values()) / max(1, made), 4),
            "scheduler_requests": sched["requests"], "scheduler_cpu_s": sched["cpu_s"],
            "http_requests": sum(o["requests"] for o in outputs),
            "http_failed_requests": sum(o["failed_requests"] for o in outputs),
            "host_cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
        }
        if args.storm:
            verdicts: dict[str, int] = {}
            for r in storm_rows:
                verdicts[r[2]] = verdicts.get(r[2], 0) + 1
            storm_lat = [(at - observed) * 1000 for at, observed, _, _ in storm_rows]
            from aidc.spec import load_stack
            from aidc.state import event_store_for

            store = event_store_for(load_stack(stack).state, lab / "state.db")
            try:
                breaker = breaker_state(stack, lab, store)
            finally:
                store.close()
            result.update({
                "storm_fraction": args.storm, "storm_events": len(storm_nodes), "storm_decided": len(storm_rows),
                "storm_all_decided_s": round(max(r[0] for r in storm_rows) - t0, 2)
                if len(storm_rows) == len(storm_nodes) and storm_rows else None,
                "storm_decision_ms_p99": round(pct(storm_lat, 0.99), 1) if storm_lat else None,
                "storm_verdicts": verdicts, "breaker": breaker,
            })
        if args.keep:
            result["kept"] = str(tmp)
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                polling.stop_process_group(p)
        if pg is not None:
            pg.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Figures and how to read them: docs/benchmarks.md, 'Fleet scale'.")
    ap.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    ap.add_argument("--rate", type=float, default=0.1, help="fault events per node per second (default 0.1)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds the fleet generates events (default 30)")
    ap.add_argument("--storm", type=float, default=0.0,
                    help="fraction of nodes that raise a fatal fault (XID 79) within 30 s, e.g. 0.1")
    ap.add_argument("--state", choices=("sqlite", "postgres"), default="sqlite", help="the controller's state backend")
    ap.add_argument("--dsn", help="with --state postgres: use this PostgreSQL database (an empty one: its events are "
                    "counted) instead of starting one")
    ap.add_argument("--generators", type=int, default=2, help="fleet processes (default 2)")
    ap.add_argument("--rack-size", type=int, default=5000, help="nodes per relay (default 5000)")
    ap.add_argument("--drain-s", type=float, default=60.0,
                    help="after generating, wait at most this long for every event to be decided (default 60)")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (logs, store, audit log)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--role", choices=("bench", "controller", "generator"), default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "controller":
        run_controller([a for a in args.rest if a != "--"], Path(args.stats))
        return 0
    if args.role == "generator":
        run_generator(json.loads(Path(args.config).read_text()))
        return 0
    for name in ("nodes", "generators", "rack_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.storm <= 1 or args.rate < 0 or args.duration <= 0:
        ap.error("--storm is a fraction 0-1, --rate >= 0, --duration > 0")
    if args.dsn and args.state != "postgres":
        ap.error("--dsn goes with --state postgres")
    # A stop (SIGTERM, timeout(1)) ends the run through its cleanup: processes, PostgreSQL, files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:<32} {value}")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
