"""`aidc burnin`: certify the lab's nodes (GEMM, memcpy, collective sweeps, DDP/FSDP/pipeline + SDC check)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from aidc.cli.options import (VocabularyGroup, audit_db_option, choice_option, resolve_stack_and_state_dir,
                              scheduler_names, stack_option, state_dir_option)

from aidc.cli.output import JSON_OPTION, emit
from aidc.cli.requires import require

app = typer.Typer(cls=VocabularyGroup, help="Burn in nodes: GEMM and memory bandwidth per node, collectives and DDP/FSDP/pipeline"
                       " training across nodes,"
                       " judged against the fleet median and the spec's floors.", no_args_is_help=True)

STACK_OPTION = typer.Option("lab", "--stack", "-s", envvar="AIDC_STACK", help="Stack name (reads Pulumi.<stack>.yaml) or a path.")
KNOWN_ANSWERS_OPTION = typer.Option(None, "--known-answers", help="Stored known answers of the SDC checks (default:"
                                    " <lab-dir>/known_answers.yaml, over the packaged ones).")
RECORD_OPTION = typer.Option(False, "--record-known-answers", help="After the run, store the answers every GPU"
                             " agreed on into the --known-answers file.")
SOAK_OPTION = typer.Option(0.0, "--soak-s", min=0.0, help="Hold GEMM load this many seconds, recording clocks,"
                           " throttle reasons, temperature and power; a GPU whose clock sags fails (added to --timeout).")


def _table(report) -> "object":
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"burn-in of stack {report.stack} ({report.duration_s:.1f} s)")
    table.add_column("node", no_wrap=True)
    for col in ("GEMM fp32\nTFLOP/s", "GEMM bf16\nTFLOP/s", "memcpy\nGB/s (r+w)",
                "busbw max\nGB/s", "verdict", "reasons"):
        table.add_column(col, overflow="fold")
    for name, n in report.nodes.items():
        m = n.metrics
        fmt = lambda k: f"{m[k]:.4g}" if k in m else "-"  # noqa: E731
        # Names and reasons are data: a "[...]" in them is text, not rich markup.
        table.add_row(escape(name) + (" (spare)" if n.spare else ""), fmt("gemm_fp32_tflops"), fmt("gemm_bf16_tflops"),
                      fmt("memcpy_gbps"), fmt("allreduce_busbw_gbps"),
                      "[green]pass[/]" if n.passed else "[red]FAIL[/]", escape("\n".join(n.reasons)) or "-")
    return table


def _collectives_table(report) -> "object":
    """Each collective at the sweep's largest size (slowest rank, as nccl-tests reports), beside the link rate."""
    from rich.table import Table

    from aidc.units import human_bytes

    rate = report.fleet["link_rate_gbps"]
    table = Table(title=f"collectives over {report.fleet['collective_ranks']} ranks"
                        f" ({report.fleet['collective_backend']}); link rate {rate * 8:g} Gb/s = {rate:.4g} GB/s,"
                        f" floor {report.fleet['min_busbw_fraction']:.0%}")
    for col in ("collective", "size", "time us", "algbw GB/s", "busbw GB/s", "of link", "correct"):
        table.add_column(col, justify="left" if col == "collective" else "right")
    for op, rows in report.fleet["collectives"].items():
        if rows:
            top = rows[-1]
            table.add_row(op, human_bytes(top["bytes"]), f"{top['time_us']:.0f}", f"{top['algbw_gbps']:.3g}",
                          f"{top['busbw_gbps']:.3g}",
                          f"{top['link_fraction']:.1%}" + (" [red]implausible[/]" if top.get("above_link_rate") else ""),
                          "yes" if all(r["correct"] for r in rows) else "[red]NO[/]")
    return table


@app.command("run")
def run(stack: str = stack_option(),
        lab_dir: Path = state_dir_option(help="State directory (the lab's nodes/<node> live here); .aidc/lab "
                                              "only for the lab stack."),
        audit_db: Path = typer.Option(None, "--audit-db", help="Audit database (default: <lab-dir>/audit.db)."),
        timeout: float = typer.Option(300.0, "--timeout", min=1.0,
                                     help="Seconds before the whole run is abandoned."),
        nodes: str = typer.Option(None, "--nodes", help="Burn in only these nodes (comma-separated names)."),
        scheduler: str = choice_option(None, "--scheduler", scheduler_names(), "Launch through this scheduler instead of the"
                                      " stack's: `slurm` on the lab stack burns in through the kept Slurm lab"
                                      " in --state-dir."),
        known_answers: Path = KNOWN_ANSWERS_OPTION, record_known_answers: bool = RECORD_OPTION,
        soak_s: float = SOAK_OPTION,
        as_json: bool = JSON_OPTION) -> None:
    """Burn in the stack's nodes (spares included) through its scheduler; exit 1 when any node fails."""
    stack, lab_dir = resolve_stack_and_state_dir(stack, lab_dir)
    from aidc.burnin.answers import load_all, record

    from aidc.audit.log import AuditLog
    from aidc.burnin.launch import launcher_for, resolve_stack, select_nodes
    from aidc.spec import load_stack

    spec = resolve_stack(load_stack(stack), scheduler, lab_dir)
    selected = select_nodes(spec, nodes)
    launcher = launcher_for(spec.scheduler)
    # Before the node directories, the fabric's namespaces and the audit log: an installation
    # without torch hears so and keeps its lab directory as it was.
    require("torch")
    from aidc.library_output import library_output_to

    answers_file = known_answers or lab_dir / "known_answers.yaml"
    stored = load_all(answers_file)
    # torch's own warnings (c10d's, from C++) go to the lab's log, not over the progress bar.
    with AuditLog(audit_db or lab_dir / "audit.db") as audit, library_output_to(lab_dir / "logs" / "burnin.log"):
        result = launcher.run(spec, selected, lab_dir=lab_dir, audit=audit, progress=not as_json, timeout_s=timeout,
                              say=lambda msg: typer.echo(msg, err=True), known_answers=stored, soak_s=soak_s)
    report = result.report
    if record_known_answers:  # to stderr: --json's stdout stays the report
        recorded, skipped = record(answers_file, report.nodes)
        typer.echo(f"known answers: recorded {len(recorded)} key(s) into {answers_file}"
                   + (f"; not recorded (the GPUs disagreed): {', '.join(skipped)}" if skipped else ""), err=True)
    if as_json:
        emit({"launcher": launcher.name, "job_id": result.job_id, **report.to_dict()}, True)
    else:
        from rich.console import Console

        console = Console()
        if result.job_id:
            console.print(f"launched by {launcher.name}: job {result.job_id}")
        console.print(_table(report))
        console.print(_collectives_table(report))
        steps = report.fleet["step_time_ms"]
        console.print("training step time (fleet median): " + ", ".join(
            f"{name} {steps[mode]:.3g} ms" for mode, name in (("ddp", "DDP"), ("fsdp", "FSDP"),
                                                              ("pipeline", "2-stage pipeline")) if mode in steps))
        console.print(f"certified: {', '.join(report.certified_nodes) or 'none'}; failed:"
                      f" {', '.join(report.failed_nodes) or 'none'}")
    if not report.passed:
        raise typer.Exit(1)


certificate_app = typer.Typer(cls=VocabularyGroup, help="Signed burn-in certificates: export one from the audit log, verify one offline.",
                              no_args_is_help=True)
app.add_typer(certificate_app, name="certificate")


@certificate_app.command("export")
def certificate_export(
        node: str = typer.Argument(..., help="The node whose latest burn-in certificate to export."),
        db: Path = audit_db_option(..., "Audit database holding the certificate."),
        out: Path = typer.Option(..., "--out", help="Where to write the signed certificate (JSON)."),
        stack: str = typer.Option(None, "--stack", "-s", envvar="AIDC_STACK", help="Sign with this stack's key (default: the key the "
                                  "log is signed with, named by <db>.signing)."),
        lab_dir: Path = typer.Option(None, "--lab-dir", help="With --stack: the lab's own keyring."),
        as_json: bool = JSON_OPTION) -> None:
    """Write NODE's latest burn-in certificate as a signed document (refused unless the log verifies)."""
    from aidc.audit.log import AuditLog, configured_signer
    from aidc.burnin.certificate import export_certificate
    from aidc.errors import AuditError
    from aidc.files import derived_mode, write_atomic

    if stack is not None:
        from aidc.cli.kms_cmd import _open as open_stack_key

        signer, _ = open_stack_key(stack, lab_dir)
    else:
        signer = configured_signer(db)
        if signer is None:
            raise AuditError(f"{db} names no signing key ({db}.signing is missing): pass --stack")
    try:
        with AuditLog(db, read_only=True) as log:
            document = export_certificate(log, node, signer)
    finally:
        signer.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    # The certificate copies a record of the log: it is as private as the log.
    write_atomic(out, json.dumps(document, indent=1, sort_keys=True) + "\n", derived_mode(db))
    emit({"out": str(out), "node": node, "verdict": document["verdict"], "seq": document["record"]["seq"]}, as_json,
         f"wrote {out}: node {node}, burn-in {document['verdict']} (audit record {document['record']['seq']})")


@certificate_app.command("verify")
def certificate_verify(
        file: Path = typer.Argument(..., help="A certificate written by `aidc burnin certificate export`."),
        public_key: Path = typer.Option(..., "--public-key", help="The signing public key (PEM file, from "
                                        "`aidc kms public-key`)."),
        as_json: bool = JSON_OPTION) -> None:
    """Check a certificate's signature offline; exit 0 when valid, 1 with the reason when not."""
    from aidc.burnin.certificate import verify_certificate
    from aidc.cli.audit_cmd import read_public_key
    from aidc.errors import AuditError  # exit 1: the certificate is not shown valid

    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    valid, why = verify_certificate(text, read_public_key(public_key))
    emit({"valid": valid, "reason": why, "file": str(file)}, as_json, f"{file}: {'valid' if valid else 'INVALID'}: {why}")
    if not valid:
        raise typer.Exit(1)


baseline_app = typer.Typer(cls=VocabularyGroup, help="Per-GPU-model baselines a node burned in alone (recertification) is judged against.",
                           no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("record")
def baseline_record(
        stack: str = STACK_OPTION,
        lab_dir: Path = typer.Option(Path(".aidc/lab"), "--state-dir", envvar="AIDC_STATE_DIR", help="Lab/state directory: the baselines are"
                                     " stored as <lab-dir>/burnin-baselines.json."),
        audit_db: Path = typer.Option(None, "--from-audit", "--audit-db", help="Audit database holding the"
                                      " certificates (default: <lab-dir>/audit.db)."),
        as_json: bool = JSON_OPTION) -> None:
    """Store, per GPU model, the median figures of the stack's nodes' latest passing certificates."""
    from aidc.audit.log import AuditLog
    from aidc.burnin import baseline
    from aidc.errors import AuditError
    from aidc.spec import load_stack

    spec = load_stack(stack)
    db = audit_db or lab_dir / "audit.db"
    if not db.exists():
        raise AuditError(f"no audit log at {db}: certify nodes first (aidc burnin run) or pass --from-audit")
    path = baseline.path_for(lab_dir)
    with AuditLog(db, read_only=True) as audit:
        checked = audit.verify()
        if not checked.ok:  # a baseline is only as good as the certificates it comes from
            raise AuditError(f"{db} does not verify ({checked.problem}): no baseline recorded from it")
        doc = baseline.record(path, audit, {n.name: n.gpu_model for n in spec.nodes()})
    emit({"file": str(path), **doc}, as_json, f"recorded burn-in baselines revision {doc['revision']} into {path}: "
         + "; ".join(f"{model} from {', '.join(e['nodes'])}" for model, e in sorted(doc["models"].items())))


@baseline_app.command("show")
def baseline_show(
        lab_dir: Path = typer.Option(Path(".aidc/lab"), "--state-dir", envvar="AIDC_STATE_DIR", help="Lab/state directory."),
        as_json: bool = JSON_OPTION) -> None:
    """Print the stored per-GPU-model burn-in baselines."""
    from aidc.burnin import baseline

    models = baseline.load(baseline.path_for(lab_dir))
    emit({"file": str(baseline.path_for(lab_dir)), "models": models}, as_json,
         "\n".join(f"{model}: " + ", ".join(f"{m} {v:.4g}" for m, v in sorted(metrics.items()))
                   for model, metrics in sorted(models.items())) or "no burn-in baselines recorded")
