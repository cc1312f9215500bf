"""`aidc failover`: the controller that turns fault events into guarded quarantines."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from aidc.audit import AuditLog
from aidc.cli.output import JSON_OPTION, emit
from aidc.spec import load_stack
from aidc.store import Store

app = typer.Typer(help="Fail over faulty nodes: quarantine within the blast radius, release by hand.",
                  no_args_is_help=True)

STACK = typer.Option("lab", "--stack", "-s", help="Stack file (policy: max_unavailable, dry_run).")
LAB_DIR = typer.Option(Path(".aidc/lab"), "--lab-dir", help="The lab (scheduler backend 'lab').")


def _state_db(lab_dir: Path) -> Path:
    path = lab_dir / "state.db"
    if not path.exists():
        from aidc.lab.cluster import LabError

        raise LabError(f"no lab state in {lab_dir} (missing state.db): start one with `aidc lab run --keep`")
    return path


def _controller(stack: str, lab_dir: Path, dry_run: bool | None, create: bool = False):
    from aidc.failover.controller import FailoverController

    spec = load_stack(stack)
    if spec.scheduler == "lab":
        from aidc.lab.cluster import lab_scheduler

        scheduler = lab_scheduler(lab_dir)
    elif spec.scheduler == "slurm" and (lab_dir / "lab.json").exists():
        # `aidc lab run --scheduler slurm`: the lab's private Slurm, plus rendezvous eviction.
        from aidc.lab.slurm_lab import lab_slurm_scheduler

        scheduler = lab_slurm_scheduler(lab_dir, spec)
    else:
        raise typer.BadParameter(f"scheduler backend {spec.scheduler!r} is not available yet; only 'lab'")

    # The controller of a new lab may start before any agent has created the store.
    db = lab_dir / "state.db" if create else _state_db(lab_dir)
    return FailoverController(spec, Store(db), AuditLog(lab_dir / "audit.db"), scheduler, dry_run=dry_run)


@app.command("run")
def run(stack: str = STACK, lab_dir: Path = LAB_DIR,
        dry_run: bool = typer.Option(None, "--dry-run/--no-dry-run", help="Override the spec's policy.dry_run."),
        poll: float = typer.Option(0.05, help="Seconds between looks at the event store.")) -> None:
    """Run the controller until SIGTERM/SIGINT."""
    ctl = _controller(stack, lab_dir, dry_run, create=True)
    # Warm: the rendezvous notification needs torch.distributed; import it now, not
    # on the failover path.
    import torch.distributed  # noqa: F401

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ctl.run(stop, poll)


@app.command("release")
def release(node: str = typer.Argument(..., help="Node to return to service."),
            reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
            actor: str = typer.Option("operator", "--actor", help="Who is releasing it."),
            stack: str = STACK, lab_dir: Path = LAB_DIR,
            dry_run: bool = typer.Option(None, "--dry-run/--no-dry-run",
                                         help="Override the spec's policy.dry_run (record, change nothing)."),
            as_json: bool = JSON_OPTION) -> None:
    """Return a quarantined node to service (an operator's decision, audited as theirs)."""
    ctl = _controller(stack, lab_dir, dry_run)
    ctl.release(node, reason, actor)
    # The controller settled dry-run (flag, else the spec's policy); report what it did.
    emit({"node": node, "released": not ctl.dry_run}, as_json,
         f"{node}: {'would be ' if ctl.dry_run else ''}released")


@app.command("status")
def status(lab_dir: Path = LAB_DIR, as_json: bool = JSON_OPTION) -> None:
    """Show node states and the fault events with their outcomes."""
    store = Store(_state_db(lab_dir))
    events = [{"id": i, "node": e.node, "kind": e.kind.value, "xid": e.xid, "action": e.action.value, "outcome": o}
              for i, e, o in store.events()]
    states = {n: store.node_state(n) for n in {e["node"] for e in events} | set(store.nodes_in_state("quarantined", "quarantining"))}
    text = "\n".join([f"{n}: {s}" for n, s in sorted(states.items())] +
                     [f"event {e['id']}: {e['node']} {e['kind']} xid={e['xid']} -> {e['action']} [{e['outcome'] or 'pending'}]" for e in events])
    emit({"nodes": states, "events": events}, as_json, text or "no events")
