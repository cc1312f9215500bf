"""`aidc lab`: the whole loop on one machine with simulated GPUs."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from aidc.cli.options import VocabularyGroup, choice_option, state_dir_option

from aidc.cli.output import JSON_OPTION, emit
from aidc.cli.requires import require
from aidc.goodput.accounting import ETTR_DEFINITION
from aidc.milestones import DEFINITIONS
from aidc.spec import load_stack

app = typer.Typer(cls=VocabularyGroup, help="Run the whole aidc loop on this machine: simulated GPUs, real processes, real faults.",
                  no_args_is_help=True)

LAB_DIR = state_dir_option(lab=True, help="Where the lab keeps its nodes, logs, state and audit log.")


@app.command("run")
def run(stack: str = typer.Option("lab", "--stack", "-s", envvar="AIDC_STACK", help="Stack file to bring the lab up from."),
        lab_dir: Path = LAB_DIR,
        keep: bool = typer.Option(False, "--keep", help="Leave the lab's agents and services up afterwards."),
        scheduler: str = choice_option("lab", "--scheduler", ("lab", "slurm"),
                                       "lab: the lab's own processes; slurm: a private real Slurm (root, "
                                           "`make system-deps`) runs the training as one job and drains the node."),
        ranks: str = typer.Option(None, "--ranks",
                                  help="node: one training rank per node, a fault takes the node out (default: the "
                                       "stack's lab.ranks); gpu: one rank per GPU, and the lab injects a fault local "
                                       "to one GPU (lab.gpu_inject_xid): only that GPU's rank leaves, its node's "
                                       "other ranks keep training."),
        as_json: bool = JSON_OPTION) -> None:
    """Certify the lab's nodes, train, inject XID 79, fail over to the spare, and audit it all.
    With --ranks gpu: inject a fault on one GPU and take only that GPU out.

    Exit 0 only when the loop completed, met its targets (steps_lost within the checkpoint
    interval) and the audit log verifies.
    """
    import signal

    from aidc.lab.run import LabRun

    def interrupted(*_):  # SIGTERM stops the lab like Ctrl-C: cleanup runs, nothing is orphaned
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    if scheduler not in ("lab", "slurm"):
        raise typer.BadParameter(f"--scheduler must be lab or slurm, not {scheduler!r}")
    if ranks not in (None, "node", "gpu"):
        raise typer.BadParameter(f"must be node or gpu, not {ranks!r}", param_hint="--ranks")
    spec = load_stack(stack)
    if ranks is not None:
        spec = spec.model_copy(update={"lab": spec.lab.model_copy(update={"ranks": ranks})})
    if ranks == "gpu" and scheduler == "slurm":
        raise typer.BadParameter("one rank per GPU runs with the lab scheduler (Slurm drains the node: see "
                                 "docs/architecture.md)", param_hint="--ranks")
    if spec.device_backend != "sim" or spec.scheduler != "lab":
        raise typer.BadParameter(f"stack {stack!r} is not a lab stack (device_backend sim, scheduler lab)")
    # Burn-in and training need torch, the nodes' agents prometheus_client: said before the lab
    # directory, its audit log or a namespace is made.
    require("torch", "prometheus_client")
    if scheduler == "slurm":
        from aidc.lab.slurm_lab import check_slurm_available

        check_slurm_available()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if as_json else (lambda msg: print(msg, flush=True))
    result = LabRun(spec, stack, lab_dir, progress=say, scheduler=scheduler).run(keep=keep)
    emit(result.to_dict(), as_json, summary_text(result))
    if not (result.completed and result.audit_verified):
        raise typer.Exit(1)


def summary_text(result) -> str:
    """The lab's summary for people: the figures of --json, each with its definition
    (aidc.milestones), and "not reached" where a loop that stopped early has none."""
    def figure(value, unit: str = "") -> str:
        return "not reached" if value is None else f"{value}{unit}"

    fault = "not reached" if result.victim is None else \
        (f"XID {result.xid} on {result.victim}" if result.xid is not None else f"on {result.victim}")
    return "\n".join([
        "",
        "aidc lab: " + ("loop completed" if result.completed else "loop did NOT complete"),
        *([f"  error             {result.error}"] if result.error else []),
        f"  certified nodes   {', '.join(result.certified_nodes) or 'none'}",
        f"  scheduler         {result.scheduler}",
        f"  fabric            {_fabric_line(result.fabric)}",
        f"  fault             {fault}",
        *([f"  taken out         gpu {result.victim_gpu} of {result.victim}; the node "
           + ("kept training on its other GPUs" if result.node_kept_training else "did NOT keep training")]
          if result.victim_gpu is not None else []),
        *([f"  drain reason      {figure(result.drain_reason)}   (sinfo -R)"] if result.scheduler == "slurm" else []),
        *(f"  {key:<17} {figure(getattr(result, key))}   ({DEFINITIONS[key]})"
          for key in ("detect_ms", "quarantine_ms", "resume_s")),
        f"  steps_lost        {figure(result.steps_lost)}",
        f"  ettr              {figure(result.ettr)}   ({ETTR_DEFINITION})",
        f"  checkpoint advice {_advice_line(result.checkpoint_advice)}",
        f"  checkpoints       {_key_line(result.checkpoint_key)}",
        f"  report            {result.report_html or 'not written'}",
        f"  audit log         {result.audit_db or 'not opened'} "
        f"({'verified' if result.audit_verified else 'VERIFICATION FAILED'})",
        f"  wall time         {result.wall_s} s",
    ])


def _fabric_line(fabric: dict) -> str:
    if fabric["kind"] != "netns":
        return "loopback"
    return (f"netns, {fabric['rails']} rail(s) at {fabric['rail_mbit']:g} Mbit/s (scale {fabric['scale']:.3g});"
            f" training {'on the rails' if fabric['training'] else 'on loopback'}")

def _advice_line(advice: dict) -> str:
    if not advice:
        return "none"
    if "error" in advice:
        return advice["error"]
    steps = f" (~{advice['advised_interval_steps']} steps)" if advice.get("advised_interval_steps") else ""
    return (f"every {advice['advised_interval_s']:.3f} s{steps} (Daly 2006; save cost {advice['save_cost_s'] * 1000:.2f} ms,"
            f" observed MTBF {advice['mtbf']['seconds']:.0f} s; `aidc goodput advise`)")


def _key_line(key: dict) -> str:
    if not key:
        return "none written"
    return f"{key['cipher']}, key {key['key_id']} version {key['key_version']} ({key['provider']}; newest {key['checkpoint']})"


@app.command("down")
def down(lab_dir: Path = LAB_DIR, as_json: bool = JSON_OPTION) -> None:
    """Stop everything a lab started (agents, controller, rendezvous store, training, its private Slurm)."""
    from aidc.lab import fabric
    from aidc.lab.cluster import LabCluster

    manifest = lab_dir / "lab.json"
    stopped = LabCluster(load_stack("lab"), lab_dir).stop() if manifest.exists() else 0
    # After the processes: a namespace still holding a process would outlive its deletion.
    # By name prefix, so also what a killed lab (or a burn-in alone) left behind.
    removed = fabric.teardown(lab_dir)
    if not manifest.exists() and not removed:
        return emit({"stopped": 0, "namespaces_removed": []}, as_json, f"no lab in {lab_dir}")
    emit({"stopped": stopped, "namespaces_removed": removed}, as_json,
         f"stopped {stopped} lab process group(s) in {lab_dir}"
         + (f"; removed {len(removed)} network namespace(s)" if removed else ""))


@app.command("fabric")
def fabric_up(stack: str = typer.Option("lab", "--stack", "-s", envvar="AIDC_STACK", help="Stack whose fabric to bring up."),
              lab_dir: Path = LAB_DIR, as_json: bool = JSON_OPTION) -> None:
    """Bring up (or show) the lab's netns fabric: a namespace per node, a shaped bridge per rail."""
    from aidc.lab import fabric

    spec = load_stack(stack)
    # No mkdir here: bring_up makes the lab directory once namespaces can be made.
    built = fabric.ensure(spec, lab_dir, say=lambda msg: print(msg, file=sys.stderr if as_json else sys.stdout))
    if built is None:
        return emit({"kind": "loopback"}, as_json, f"stack {stack!r}: loopback fabric (nothing to bring up)")
    emit(built.to_dict(), as_json, f"fabric.json in {lab_dir}")


@app.command("status")
def status(lab_dir: Path = LAB_DIR, as_json: bool = JSON_OPTION) -> None:
    """List the lab's processes that are still running."""
    from aidc.lab.cluster import LabCluster

    if not (lab_dir / "lab.json").exists():
        return emit({"running": []}, as_json, f"no lab in {lab_dir}")
    running = LabCluster(load_stack("lab"), lab_dir).running()
    emit({"running": running}, as_json,
         "\n".join(f"{p['pid']:>7} {p['name']}" for p in running) or "nothing running")
