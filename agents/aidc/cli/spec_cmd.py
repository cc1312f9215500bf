"""`aidc spec`: show and check the cluster spec of a stack."""

from __future__ import annotations

import typer

from aidc.cli.options import VocabularyGroup

from aidc.cli.output import JSON_OPTION, emit
from aidc.errors import SpecError
from aidc.spec import cluster_json_schema, load_stack

app = typer.Typer(cls=VocabularyGroup, help="Show and validate the cluster spec (Pulumi.<stack>.yaml, key aidc:cluster).",
                  no_args_is_help=True)

STACK_OPTION = typer.Option("lab", "--stack", "-s", envvar="AIDC_STACK", help="Stack name (reads Pulumi.<stack>.yaml) or a path.")


@app.command("show")
def show(stack: str = STACK_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Print the validated spec with defaults filled in, and the nodes it defines."""
    spec = load_stack(stack)
    data = spec.model_dump(mode="json")
    data["nodes"] = [n.__dict__ for n in spec.nodes()]
    if as_json:
        return emit(data, True)
    lines = [f"cluster {spec.name}: device backend {spec.device_backend}, scheduler {spec.scheduler}"]
    for pool in spec.node_pools:
        lines.append(f"  pool {pool.name}: {pool.count} x {pool.gpus_per_node} {pool.gpu_model}"
                     f" + {pool.spares} spare(s), provisioner {pool.provisioner}")
    f = spec.fabric
    lines.append(f"  fabric: {f.kind}, {f.rails} rail(s) at {f.link_speed_gbps:g} Gb/s")
    s = spec.storage
    lines.append(f"  storage: datasets {s.datasets.storage_class} {s.datasets.size},"
                 f" checkpoints {s.checkpoints.storage_class} {s.checkpoints.size}")
    lines.append(f"  kms: {spec.kms.provider} key {spec.kms.key_id}, rotation {spec.kms.rotation_days} d")
    p = spec.policy
    lines.append(f"  policy: dry_run={p.dry_run}, max_unavailable={p.max_unavailable}"
                 f" ({p.max_unavailable_nodes(len(spec.nodes()))} node(s))")
    lines.append("  nodes: " + ", ".join(n.name + (" (spare)" if n.spare else "") for n in spec.nodes()))
    emit(data, False, "\n".join(lines))


@app.command("check")
def check(stack: str = STACK_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Validate the stack file; exit 0 when it is valid, 2 listing every problem (key path, expected) when not.

    Also checks the KMS provider the stack names: one this build lacks is a problem (exit 2);
    one whose library is not installed on this machine is a warning (the key may be used
    elsewhere), so neither waits for the first checkpoint to be found out."""
    try:
        spec = load_stack(stack)
        _check_kms_provider(stack, spec)
    except SpecError as exc:
        if as_json:  # the error document (aidc.cli.main) carries the `problems` list
            raise
        # One line per problem, each in the one-line error's form (file: key: expected).
        for key, expected in exc.problems:
            typer.echo(f"aidc: error: {exc.file}: {key}: {expected}", err=True)
        if exc.problems_total > len(exc.problems):
            typer.echo(f"aidc: error: {exc.file}: (and {exc.problems_total - len(exc.problems)} more problem(s) "
                       f"not listed)", err=True)
        raise typer.Exit(exc.exit_code) from None
    from aidc.kms import missing_library

    warnings = [w for w in (missing_library(spec.kms.provider),) if w]
    for warning in warnings if not as_json else []:
        typer.echo(f"aidc: warning: {warning}", err=True)
    emit({"ok": True, "stack": stack, "nodes": len(spec.nodes()), "warnings": warnings}, as_json,
         f"{stack}: valid ({len(spec.nodes())} nodes)")


def _check_kms_provider(stack: str, spec) -> None:
    from aidc.kms import unavailable_reason
    from aidc.spec import stack_path

    reason = unavailable_reason(spec.kms.provider)
    if reason:
        raise SpecError(str(stack_path(stack)), "kms.provider", f"a provider this build can use: {reason}")


@app.command("schema")
def schema(stack_file: bool = typer.Option(False, "--stack-file", help="The schema of a whole Pulumi.<stack>.yaml "
                                           "(config.aidc:cluster inside), for an editor's YAML support."),
           as_json: bool = JSON_OPTION) -> None:
    """Print the JSON Schema (draft 2020-12) of the aidc:cluster value, made from the spec's model.

    It states types, bounds, choices and unknown keys; relations between fields (e.g. hcas as
    many as rails) are left to `aidc spec check`."""
    emit(cluster_json_schema(stack_file), True)  # JSON either way: --json is accepted for uniformity
