"""`aidc device`: read telemetry through a backend, and inject faults into the lab's GPUs."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from aidc.cli.options import DEVICE_BACKENDS, VocabularyGroup, choice_option

from aidc.cli.output import JSON_OPTION, emit
from aidc.device import TimedBackend, open_backend
from aidc.device import sim

app = typer.Typer(cls=VocabularyGroup, help="Per-GPU telemetry through the nvml or sim backend; lab fault injection.",
                  no_args_is_help=True)


@app.command("show")
def show(backend: str = choice_option("nvml", "--backend", DEVICE_BACKENDS, "nvml (real driver) or sim (lab)."),
         node_dir: Path = typer.Option(None, help="Simulated node directory (sim backend)."),
         timeout: float = typer.Option(2.0, help="Seconds before a device call counts as hung."),
         as_json: bool = JSON_OPTION) -> None:
    """Print every telemetry field of every GPU."""
    if timeout <= 0:
        raise typer.BadParameter(f"must be > 0 seconds, not {timeout}", param_hint="--timeout")
    if backend == "sim" and node_dir is None:
        # The sim backend reads one simulated node's state; without it there is nothing to show.
        raise typer.BadParameter("is required with --backend sim (the lab's nodes/<name>)",
                                 param_hint="--node-dir")
    kwargs = {"node_dir": node_dir} if backend == "sim" else {}
    dev = TimedBackend(open_backend(backend, **kwargs), timeout)
    try:
        gpus = [asdict(dev.telemetry(i)) for i in range(dev.gpu_count())]
    finally:
        dev.close()
    lines = [f"gpu {g['index']} {g['pci_bus_id']} {g['name']}: {g['temperature_c']:.0f} C, {g['power_w']:.0f} W,"
             f" ECC DBE {g['ecc_dbe_volatile']}, PCIe Gen{g['pcie_gen']}x{g['pcie_width']}"
             f" (max Gen{g['pcie_gen_max']}x{g['pcie_width_max']})" for g in gpus]
    emit(gpus, as_json, "\n".join(lines) or "no GPUs")


@app.command("inject")
def inject(node_dir: Path = typer.Argument(..., help="Simulated node directory (the lab's nodes/<name>)."),
           fault: str = typer.Argument(..., help=f"One of: {', '.join(sim.FAULTS)}, link."),
           gpu: int = typer.Option(0, help="GPU index."),
           xid: int = typer.Option(79, help="XID code (fault 'xid')."),
           factor: float = typer.Option(4.0, help="Slowdown factor (fault 'slowdown')."),
           seconds: float = typer.Option(30.0, help="Hang duration (fault 'hang')."),
           rail: int = typer.Option(None, "--rail", help="Rail index (fault 'link')."),
           rate: float = typer.Option(None, "--rate", help="Link: cut the rail to this fraction of its rate. sdc: make"
                                                           " this fraction of each GEMM result wrong (default: one"
                                                           " element)."),
           loss: float = typer.Option(None, "--loss", help="Link: drop this percentage of the rail's packets."),
           down: bool = typer.Option(False, "--down", help="Link: take the rail down."),
           up: bool = typer.Option(False, "--up", help="Link: bring the rail up again."),
           clear: bool = typer.Option(False, "--clear", help="Link: restore the rail (up, full rate, no loss)."),
           as_json: bool = JSON_OPTION) -> None:
    """Inject a fault into a simulated (lab) GPU, writing the driver's kernel-log lines too (`sdc`: wrong
    GEMM results and no line at all, as silent data corruption is); or,
    with `link`, into a rail of the lab's netns fabric (tc rate, nftables loss, link down)."""
    if fault == "link":
        from aidc.lab.fabric import FabricError, inject_link

        if rail is None:
            raise FabricError("link needs --rail R (and one of --rate, --loss, --down, --up, --clear)")
        state = inject_link(node_dir, rail, rate=rate, loss_pct=loss, down=down, up=up, clear=clear)
        return emit(state, as_json, f"rail {rail} of {state['node']} ({state['netns']} {state['ifname']}):"
                                    f" {'up' if state['up'] else 'DOWN'}, rate {state['rate_fraction']:.0%},"
                                    f" loss {state['loss_pct']:g}%")
    if rate is not None and fault != "sdc":
        raise typer.BadParameter(f"applies to the faults link and sdc, not {fault}", param_hint="--rate")
    done = sim.inject(node_dir, fault, gpu, xid=xid, factor=factor, seconds=seconds, rate=rate)
    emit(done, as_json, f"injected {fault} on gpu {gpu} of {node_dir}" + "".join(f"\n  {l}" for l in done["lines"]))


@app.command("sim-node")
def sim_node(node_dir: Path = typer.Argument(..., help="Directory of the simulated node (created)."),
             node: str = typer.Option(..., "--node", help="The node's name (as in the cluster spec)."),
             gpus: int = typer.Option(..., "--gpus", min=1, max=16, help="Simulated GPUs on the node."),
             rails: int = typer.Option(0, "--rails", min=0, max=32, help="Simulated InfiniBand ports, one per rail."),
             as_json: bool = JSON_OPTION) -> None:
    """Lay out one simulated node for the sim backend (healthy GPUs, an empty kernel log), as the
    lab does for each of its nodes; the aidc_agent role runs it on hosts of a `device_backend: sim`
    stack. A node directory that exists already is left as it is (its faults stay)."""
    state = node_dir / sim.STATE_FILE
    created = not state.exists()
    if created:
        sim.create_node(node_dir, node, gpus, rails=rails)
    emit({"node_dir": str(node_dir), "node": node, "created": created}, as_json,
         f"{'created' if created else 'kept'} simulated node {node} in {node_dir}")
