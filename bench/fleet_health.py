"""What the fleet-health figure costs on a big audit log.

Writes an audit log (the real AuditLog, hash chain and all) for a fleet of `--nodes` nodes of 8
GPUs in two pools: one burn-in certificate per node, `--faults` quarantines each followed by a
release, and filler records of other kinds (health faults, decisions) up to `--records`. Then
times, side by side: the full replay `aidc fleet health` does (read the figure's record kinds,
replay to now), a `--compare` across the whole log, the controller's first /metrics scrape
(full catch-up) and a scrape after one new record (incremental). Prints medians of `--repeat`
runs and the ratio full / incremental.
Usage: python bench/fleet_health.py [--nodes 1000] [--records 3000] [--faults 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))

from aidc.audit.log import AuditLog  # noqa: E402
from aidc.failover.metrics import FailoverMetrics  # noqa: E402
from aidc.fleet.figure import Rules, audit_records, compare, figure_at  # noqa: E402
from aidc.spec import parse_spec  # noqa: E402


def fleet_spec(nodes: int):
    half = nodes // 2
    return parse_spec({"name": "bench", "device_backend": "sim", "policy": {"max_unavailable": 1},
                       "node_pools": [{"name": "train", "count": half, "gpu_model": "SIM", "gpus_per_node": 8},
                                      {"name": "infer", "count": nodes - half, "gpu_model": "SIM",
                                       "gpus_per_node": 8}]})


def write_log(db: Path, spec, records: int, faults: int) -> None:
    names = [n.name for n in spec.nodes()]
    with AuditLog(db) as log:
        for name in names:
            log.append("burnin.certificate", "passed burn-in", actor="burnin", node=name,
                       payload={"verdict": "pass", "failed_gpus": []})
        for i in range(faults):
            node = names[(i * 7) % len(names)]
            log.append("failover.action", "quarantined through lab", actor="failover", node=node, payload={})
            log.append("failover.release", "repaired", actor="user:ops", node=node, payload={"dry_run": False})
        for i in range(max(0, records - len(names) - 2 * faults)):
            log.append("health.fault", "XID 31", actor="agent", node=names[i % len(names)], payload={"xid": 31})


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--faults", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    spec, rules = fleet_spec(args.nodes), Rules.shipped()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "audit.db"
        start = time.perf_counter()
        write_log(db, spec, args.records, args.faults)
        written_s = time.perf_counter() - start

        def full_replay():
            with AuditLog(db, read_only=True) as log:
                figure_at(spec, audit_records(log, rules), time.time())

        def full_compare():
            with AuditLog(db, read_only=True) as log:
                records = audit_records(log, rules)
                compare(spec, records, records[0].ts, time.time())

        def first_scrape():
            metrics = FailoverMetrics()
            metrics.add_fleet_health(spec, db)
            metrics.text()

        warm = FailoverMetrics()
        warm.add_fleet_health(spec, db)
        warm.text()

        def incremental_scrape():
            with AuditLog(db) as log:
                log.append("failover.action", "quarantined", actor="failover", node=spec.nodes()[0].name, payload={})
            start = time.perf_counter()
            warm.text()
            return time.perf_counter() - start

        result = {"nodes": args.nodes, "gpus": 8 * args.nodes, "records": args.records, "faults": args.faults,
                  "write_log_s": round(written_s, 2),
                  "fleet_health_s": median_s(full_replay, args.repeat),
                  "compare_whole_log_s": median_s(full_compare, args.repeat),
                  "first_scrape_s": median_s(first_scrape, args.repeat),
                  "incremental_scrape_s": statistics.median(incremental_scrape() for _ in range(args.repeat))}
        result["first_over_incremental"] = round(result["first_scrape_s"] / result["incremental_scrape_s"], 1)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
