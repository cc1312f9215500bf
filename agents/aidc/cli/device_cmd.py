"""`aidc device`: read telemetry through a backend, and inject faults into the lab's GPUs."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from aidc.cli.output import JSON_OPTION, emit
from aidc.device import TimedBackend, open_backend
from aidc.device import sim

app = typer.Typer(help="Per-GPU telemetry through the nvml or sim backend; lab fault injection.",
                  no_args_is_help=True)


@app.command("show")
def show(backend: str = typer.Option("nvml", help="nvml (real driver) or sim (lab)."),
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
           fault: str = typer.Argument(..., help=f"One of: {', '.join(sim.FAULTS)}."),
           gpu: int = typer.Option(0, help="GPU index."),
           xid: int = typer.Option(79, help="XID code (fault 'xid')."),
           factor: float = typer.Option(4.0, help="Slowdown factor (fault 'slowdown')."),
           seconds: float = typer.Option(30.0, help="Hang duration (fault 'hang')."),
           as_json: bool = JSON_OPTION) -> None:
    """Inject a fault into a simulated (lab) GPU; writes the driver's kernel-log lines too."""
    done = sim.inject(node_dir, fault, gpu, xid=xid, factor=factor, seconds=seconds)
    emit(done, as_json, f"injected {fault} on gpu {gpu} of {node_dir}" + "".join(f"\n  {l}" for l in done["lines"]))
