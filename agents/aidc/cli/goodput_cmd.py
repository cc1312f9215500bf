"""`aidc goodput`: a job's ETTR and where its time went; checkpoint-interval advice."""

from __future__ import annotations

from pathlib import Path

import typer

from aidc.cli.options import VocabularyGroup, listen_option, parse_listen

from aidc.cli.output import JSON_OPTION, emit
from aidc.errors import AidcError

app = typer.Typer(cls=VocabularyGroup, help="Goodput of training jobs: ETTR from a job's step log, and the checkpoint interval to use.",
                  no_args_is_help=True)

JOB = typer.Option(..., "--job", help="The job's step log (JSONL written with aidc.goodput.StepLog; "
                                     "docs/goodput-steplog.md). The lab's: .aidc/lab/train/goodput.jsonl")


@app.command("report")
def report(job: Path = JOB, as_json: bool = JSON_OPTION) -> None:
    """Split the job's wall time into productive training, checkpoint stalls, failure detection,
    restart/rendezvous, lost work and idle; print its ETTR."""
    from aidc.goodput import ETTR_DEFINITION, job_report

    g = job_report(job)
    data = g.to_dict()
    lines = [f"job {g.job or '(unnamed)'}: ETTR {g.ettr:.3f}", f"  {ETTR_DEFINITION}",
             f"  wall time {g.wall_s:.1f} s, {g.steps_kept} steps kept, {g.steps_redone} redone, "
             f"{g.restarts} restart(s), {g.faults} fault(s)"]
    for part, secs in data["seconds"].items():
        lines.append(f"  {part:<11} {secs:>10.2f} s  {data['fractions'][part] * 100:5.1f} %")
    if g.checkpoints:
        lines.append(f"  checkpoints {g.checkpoints} ({g.checkpoint_mode}), stall median "
                     f"{g.checkpoint_stall_s_median * 1000:.1f} ms"
                     + (f", write median {g.checkpoint_write_s_median * 1000:.1f} ms"
                        if g.checkpoint_write_s_median is not None else ""))
    emit(data, as_json, "\n".join(lines))


@app.command("advise")
def advise(job: Path = JOB,
           mtbf_s: float = typer.Option(None, "--mtbf-s", help="The fleet's mean time between failures as the "
                                                                "job sees it, in seconds (else from --audit-db)."),
           audit_db: Path = typer.Option(None, "--audit-db", help="Measure the MTBF from the quarantines in this "
                                                                  "audit log (e.g. .aidc/lab/audit.db)."),
           restart_s: float = typer.Option(None, "--restart-s", help="Restart cost in seconds when the step log "
                                                                     "has no measured resume."),
           as_json: bool = JSON_OPTION) -> None:
    """Recommend the checkpoint interval (Young/Daly) from the measured save cost and the MTBF,
    with the expected ETTR at the current and at the advised interval."""
    from aidc.goodput import job_advice

    a = job_advice(job, mtbf_s=mtbf_s, audit_db=audit_db, restart_s=restart_s)
    emit(a, as_json, advice_text(a))


def advice_text(a: dict) -> str:
    steps = f" (~{a['advised_interval_steps']} steps)" if a.get("advised_interval_steps") else ""
    current = ("unknown" if a["current_interval_s"] is None else
               f"{a['current_interval_s']:.3f} s -> expected ETTR {a['expected_ettr_current']:.4f}")
    m = a["mtbf"]
    source = (f"{m['faults']} fatal fault(s) in {m['window_s']:.0f} s on {m['fleet_nodes']} node(s), job on "
              f"{m['job_nodes']}" if m["source"] == "audit" else "given")
    return "\n".join([
        f"advised checkpoint interval {a['advised_interval_s']:.3f} s of compute{steps} -> expected ETTR "
        f"{a['expected_ettr_advised']:.4f}   (Daly 2006; Young: {a['young_interval_s']:.3f} s)",
        f"  current interval {current}",
        f"  save cost {a['save_cost_s'] * 1000:.2f} ms (median stall), MTBF {m['seconds']:.0f} s ({source}), "
        f"restart {a['restart_s']:.2f} s ({a['restart_source']})",
        *[f"  note: {n}" for n in a["notes"]],
    ])


@app.command("serve")
def serve(jobs: list[str] = typer.Option(..., "--job", help="NAME=PATH of a job's step log; repeat for more jobs."),
          listen_address: str = listen_option("127.0.0.1:9450", "Where /metrics listens."),
          ) -> None:
    """Export aidc_goodput_ettr{job} (and aidc_goodput_seconds{job,part}) for Prometheus, read from
    the step logs on each scrape. Runs until stopped."""
    import signal
    import threading

    from aidc.goodput.exporter import serve as start

    parsed = {}
    for item in jobs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AidcError(f"--job {item!r}: expected NAME=PATH")
        parsed[name] = Path(path)
    listen_address, port = parse_listen(listen_address, 9450)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        server, _ = start(parsed, port, listen_address)
    except OSError as exc:
        raise AidcError(f"cannot listen on {listen_address}:{port}: {exc.strerror or exc}") from None
    typer.echo(f"aidc goodput: serving http://{listen_address}:{port}/metrics for {', '.join(parsed)}", err=True)
    while not stop.wait(1.0):  # bounded wait: signals are seen within a second
        pass
    server.shutdown()
