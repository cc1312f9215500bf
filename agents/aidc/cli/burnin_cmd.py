"""`aidc burnin`: certify the lab's nodes (GEMM, memcpy, all_reduce sweep, DDP + SDC check)."""

from __future__ import annotations

from pathlib import Path

import typer

from aidc.cli.output import JSON_OPTION, emit
from aidc.errors import BurninError

app = typer.Typer(help="Burn in nodes: GEMM and memory bandwidth per node, all_reduce and DDP across nodes,"
                       " judged against the fleet median and the spec's floors.", no_args_is_help=True)

STACK_OPTION = typer.Option("lab", "--stack", "-s", help="Stack name (reads Pulumi.<stack>.yaml) or a path.")


def _table(report) -> "object":
    from rich.table import Table

    table = Table(title=f"burn-in of stack {report.stack} ({report.duration_s:.1f} s)")
    table.add_column("node", no_wrap=True)
    for col in ("GEMM fp32\nTFLOP/s", "GEMM bf16\nTFLOP/s", "memcpy\nGB/s (r+w)",
                "busbw max\nGB/s", "verdict", "reasons"):
        table.add_column(col, overflow="fold")
    for name, n in report.nodes.items():
        m = n.metrics
        fmt = lambda k: f"{m[k]:.4g}" if k in m else "-"  # noqa: E731
        table.add_row(name + (" (spare)" if n.spare else ""), fmt("gemm_fp32_tflops"), fmt("gemm_bf16_tflops"),
                      fmt("memcpy_gbps"), fmt("allreduce_busbw_gbps"),
                      "[green]pass[/]" if n.passed else "[red]FAIL[/]", "\n".join(n.reasons) or "-")
    return table


@app.command("run")
def run(stack: str = STACK_OPTION,
        lab_dir: Path = typer.Option(Path(".aidc/lab"), "--lab-dir", help="Lab directory (nodes/<node> live here)."),
        audit_db: Path = typer.Option(None, "--audit-db", help="Audit database (default: <lab-dir>/audit.db)."),
        timeout: float = typer.Option(300.0, "--timeout", min=1.0,
                                     help="Seconds before the whole run is abandoned."),
        as_json: bool = JSON_OPTION) -> None:
    """Burn in every node of the stack (spares included); exit 1 when any node fails."""
    from aidc.audit.log import AuditLog
    from aidc.spec import load_stack

    spec = load_stack(stack)
    if spec.device_backend != "sim":
        raise BurninError(f"stack {stack!r} uses the {spec.device_backend} backend; `aidc burnin run` burns in"
                          " a simulated lab fleet (on a GPU machine use bench/gpu_check.sh)")
    from aidc.burnin.runner import lab_node_dirs, run_burnin  # torch is imported inside run_burnin

    dirs = lab_node_dirs(spec, lab_dir)
    with AuditLog(audit_db or lab_dir / "audit.db") as audit:
        report = run_burnin(spec, dirs, audit, progress=not as_json, timeout_s=timeout)
    if as_json:
        emit(report.to_dict(), True)
    else:
        from rich.console import Console

        console = Console()
        console.print(_table(report))
        top = report.fleet["allreduce"][-1] if report.fleet["allreduce"] else None
        if top:
            console.print(f"all_reduce {top['nbytes']} B over {report.fleet['allreduce_ranks']} ranks (gloo):"
                          f" {top['time_us']:.0f} us, algbw {top['algbw_gbps']:.3g} GB/s, busbw"
                          f" {top['busbw_gbps']:.3g} GB/s; link rate {report.fleet['link_rate_gbit_s']:g} Gb/s"
                          f" = {report.fleet['link_rate_gbit_s'] / 8:g} GB/s")
        console.print(f"certified: {', '.join(report.certified_nodes) or 'none'}; failed:"
                      f" {', '.join(report.failed_nodes) or 'none'}")
    if not report.passed:
        raise typer.Exit(1)
