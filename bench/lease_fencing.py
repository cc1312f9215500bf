#!/usr/bin/env python3
"""What the PostgreSQL lease's fencing costs the failover controller, side by side.

    .venv/bin/python bench/lease_fencing.py [--events 300] [--transactions 2000] [--rounds 3] [--dsn DSN] --json

Starts a private PostgreSQL (unless --dsn names one; stopped after) and measures, on one
database, with the controller's real decision path (aidc.failover.controller, PostgresStore,
an SQLite audit log, a scheduler double that does nothing and costs nothing):

* decisions_per_s: E fatal events for distinct nodes decided by a controller with no lease
  (`unfenced`) and by one holding aidc.failover.pg_lease.PostgresLease, whose token is checked
  in every recording transaction (`fenced`); `ratio` = fenced / unfenced.
* transaction_ms: one store transaction writing a node state, bare and with the fence inside
  (one SELECT ... FOR SHARE on the lease row): mean milliseconds over T transactions.

The figures are this machine's at the time of the run: run both sides in one call, compare the
ratio, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agents"))

from aidc.audit import AuditLog  # noqa: E402
from aidc.events import Action, FaultEvent, FaultKind  # noqa: E402
from aidc.failover.controller import FailoverController  # noqa: E402
from aidc.failover.pg_lease import PostgresLease  # noqa: E402
from aidc.spec import parse_spec  # noqa: E402
from aidc.state import open_event_store  # noqa: E402


class IdleScheduler:
    """A scheduler that acts instantly, so the figures are the controller's and the store's."""

    name = "idle"

    def quarantine(self, node, reason, event=None):
        return None

    def release(self, node, reason):
        return None

    def state(self, node):
        return "in_service"


def _database(admin_dsn: str) -> str:
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(admin_dsn, dbname=name)


def decisions_per_s(dsn: str, events: int, fenced: bool, workdir: Path) -> float:
    spec = parse_spec({"name": "bench", "scheduler": "lab", "device_backend": "sim",
                       "node_pools": [{"name": "gpu", "count": events, "gpu_model": "SIM", "gpus_per_node": 8}],
                       "policy": {"max_unavailable": "100%", "breaker": {"max_quarantines": "100%"}}})
    store = open_event_store("postgres", dsn)
    workdir.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(workdir / f"audit-{'fenced' if fenced else 'unfenced'}.db")
    lease = PostgresLease(dsn, holder="bench", ttl_s=600) if fenced else None
    ctl = FailoverController(spec, store, audit, IdleScheduler())
    try:
        for i in range(events):
            store.append(FaultEvent(f"gpu-{i}", FaultKind.XID, Action.REBOOT_NODE, "XID 79", "kmsg", gpu=0, xid=79))
        if lease is not None:
            assert lease.hold()
            ctl.fence = lease.fence
        started = time.perf_counter()
        decided = ctl.run_once(lease.held if lease else None)
        took = time.perf_counter() - started
        assert [d.verdict for d in decided] == ["quarantine"] * events, "every event quarantined"
        return events / took
    finally:
        if lease is not None:
            lease.release()
        store.close()
        audit.close()


def transaction_ms(dsn: str, transactions: int, fenced: bool) -> float:
    store = open_event_store("postgres", dsn)
    lease = PostgresLease(dsn, holder="bench-tx", ttl_s=600)
    try:
        if fenced:
            assert lease.hold()
        started = time.perf_counter()
        for i in range(transactions):
            with store.transaction() as txn:
                if fenced:
                    lease.fence(txn)
                store.set_node_state(f"tx-{i % 100}", "quarantining", "bench", "bench")
        return (time.perf_counter() - started) * 1000 / transactions
    finally:
        lease.release()
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300, help="fatal events (one per node) per side")
    parser.add_argument("--transactions", type=int, default=2000, help="store transactions per side")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per side (medians reported)")
    parser.add_argument("--dsn", help="an existing PostgreSQL 15+ (a fresh database is made in it)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    if min(args.events, args.transactions, args.rounds) < 1:
        parser.error("--events, --transactions and --rounds must be >= 1")
    workdir = Path(tempfile.mkdtemp(prefix="aidc-lease-bench-"))
    server = None
    try:
        admin = args.dsn
        if admin is None:
            from aidc.lab.postgres_server import LocalPostgres, unavailable_reason
            from aidc.polling import free_port

            why = unavailable_reason()
            if why:
                parser.error(f"cannot start a private PostgreSQL: {why} (or pass --dsn)")
            # Its own directory, handed to the postgres user (workdir is root's 0700).
            server = LocalPostgres(Path(tempfile.mkdtemp(prefix="aidc-lease-bench-pg-")), port=free_port())
            server.start()
            admin = server.dsn
        result = {"events": args.events, "transactions": args.transactions, "rounds": args.rounds}
        # Alternated rounds, medians: a shared machine's load drifts during a run.
        runs: dict[str, list[float]] = {"unfenced": [], "fenced": [], "bare": [], "fenced_tx": []}
        dsn = _database(admin)
        for n in range(args.rounds):
            for fenced in ((False, True) if n % 2 == 0 else (True, False)):
                runs["fenced" if fenced else "unfenced"].append(
                    decisions_per_s(_database(admin), args.events, fenced, workdir / f"{n}"))
                runs["fenced_tx" if fenced else "bare"].append(transaction_ms(dsn, args.transactions, fenced))
        unfenced, fenced = statistics.median(runs["unfenced"]), statistics.median(runs["fenced"])
        bare, with_fence = statistics.median(runs["bare"]), statistics.median(runs["fenced_tx"])
        result["decisions_per_s"] = {"unfenced": round(unfenced, 1), "fenced": round(fenced, 1),
                                     "ratio": round(fenced / unfenced, 3)}
        result["transaction_ms"] = {"bare": round(bare, 3), "fenced": round(with_fence, 3),
                                    "ratio": round(with_fence / bare, 3)}
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
