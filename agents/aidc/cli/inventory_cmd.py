"""`aidc inventory`: the cluster spec as an Ansible dynamic inventory (JSON)."""

from __future__ import annotations

import typer

from aidc.cli.options import VocabularyGroup

from aidc.cli.output import JSON_OPTION, emit
from aidc.inventory import inventory_host, inventory_list
from aidc.spec import load_stack

app = typer.Typer(cls=VocabularyGroup, help="Print an Ansible inventory (JSON) generated from the cluster spec.")


@app.callback(invoke_without_command=True)
def inventory(
    stack: str = typer.Option("lab", "--stack", "-s", envvar="AIDC_STACK", help="Stack name (reads Pulumi.<stack>.yaml) or a path."),
    list_: bool = typer.Option(False, "--list", help="All groups and hosts (Ansible's dynamic-inventory call)."),
    host: str = typer.Option(None, "--host", help="One host's variables (Ansible's dynamic-inventory call)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Groups per node pool (`pool_<name>`), a `spares` group, host vars from the spec.

    Use it as a dynamic inventory: `ansible-playbook -i playbooks/inventory/aidc_spec.sh ...`
    (that script runs `aidc inventory --stack "$AIDC_STACK" "$@"`).
    """
    spec = load_stack(stack)
    if list_ and host is not None:
        raise typer.BadParameter("give --list or --host, not both")
    # Always JSON (that is what Ansible reads); --json is accepted like on every other command.
    if host is None:
        emit(inventory_list(spec), True)
    else:
        # The dynamic-inventory protocol: `--host H` answers H's variables, and `{}` for a host
        # it has no variables for (including "") -- never the whole --list document, never an error.
        known = {node.name for node in spec.nodes()}
        emit(inventory_host(spec, host) if host in known else {}, True)
