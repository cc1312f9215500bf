"""Ansible inventory generated from the cluster spec.

`aidc inventory --stack NAME --list` prints what Ansible's dynamic-inventory protocol expects:
one group per node pool (`pool_<name>`, dashes turned into underscores because Ansible warns
about dashes in group names), a `spares` group, an `aidc_controllers` group (the spec's
`controller.hosts`, machines that run the failover controller and the runbook receiver, not
training), cluster-wide facts in `all.vars`, and per-host facts under `_meta.hostvars` so
Ansible never has to call `--host` once per node. A machine whose management address the spec
lists gets it as `ansible_host` (where Ansible connects) and `aidc_management_address`.

Every variable the playbooks read about the cluster comes from here, so the playbooks cannot
drift from the spec: a node's expected GPU count, model, fabric rails and HCAs, the software
versions and the agent's settings are all the spec's values.
"""

from __future__ import annotations

from typing import Any

from aidc.errors import SpecError
from aidc.spec import ClusterSpec, ControllerHost, Node, gpu_models

SPARES_GROUP = "spares"
CONTROLLERS_GROUP = "aidc_controllers"


def pool_group(pool_name: str) -> str:
    """The Ansible group of a node pool: `pool_` + the name with dashes as underscores."""
    return "pool_" + pool_name.replace("-", "_")


def cluster_vars(spec: ClusterSpec) -> dict[str, Any]:
    """Variables every host shares (`all.vars`): the spec itself plus the parts roles read often."""
    return {
        "aidc_cluster_name": spec.name,
        "aidc_scheduler": spec.scheduler,
        "aidc_device_backend": spec.device_backend,
        "aidc_fabric": spec.fabric.model_dump(mode="json"),
        "aidc_software": spec.software.model_dump(mode="json"),
        "aidc_agent": spec.agent.model_dump(mode="json"),
        "aidc_slurm": spec.slurm.model_dump(mode="json"),
        "aidc_controller": spec.controller.model_dump(mode="json"),
        "aidc_state": spec.state.model_dump(mode="json"),
        # Where agents send their events ("": nowhere); derived here, so that the role need not.
        "aidc_agent_controller_url": spec.agent_controller_url() or "",
        # The whole spec, so the agent role can install exactly what the controller validated.
        "aidc_cluster_spec": spec.model_dump(mode="json"),
    }


def host_vars(spec: ClusterSpec, node: Node) -> dict[str, Any]:
    """Variables of one node: what the spec says this machine must have."""
    model = gpu_models()[node.gpu_model]
    return {
        "aidc_node_name": node.name,
        "aidc_pool": node.pool,
        "aidc_spare": node.spare,
        "aidc_gpu_model": node.gpu_model,
        "aidc_gpus": node.gpus,
        "aidc_gpu_simulated": bool(model.get("simulated", False)),
        "aidc_gpu_vendor": model["vendor"],
        "aidc_gpu_nvlink": bool(model.get("nvlink", False)),
        **_address_vars(node.address),
    }


def _address_vars(address: str | None) -> dict[str, str]:
    return {"ansible_host": address, "aidc_management_address": address} if address else {}


def controller_host_vars(host: ControllerHost) -> dict[str, Any]:
    """Variables of one controller machine (the spec's controller.hosts)."""
    return {"aidc_controller_name": host.name, **_address_vars(host.address)}


def inventory_list(spec: ClusterSpec) -> dict[str, Any]:
    """The `--list` document of Ansible's dynamic-inventory protocol."""
    out: dict[str, Any] = {
        "all": {"children": [pool_group(p.name) for p in spec.node_pools] + [SPARES_GROUP, CONTROLLERS_GROUP],
                "vars": cluster_vars(spec)},
        SPARES_GROUP: {"hosts": []},
        # Always present (empty without controller hosts): site.yml's node play excludes it by name.
        CONTROLLERS_GROUP: {"hosts": [h.name for h in spec.controller.hosts]},
        "_meta": {"hostvars": {h.name: controller_host_vars(h) for h in spec.controller.hosts}},
    }
    for pool in spec.node_pools:
        out[pool_group(pool.name)] = {"hosts": [], "vars": {"aidc_pool_provisioner": pool.provisioner,
                                                            "aidc_pool_labels": dict(pool.labels)}}
    for node in spec.nodes():
        out[pool_group(node.pool)]["hosts"].append(node.name)
        if node.spare:
            out[SPARES_GROUP]["hosts"].append(node.name)
        out["_meta"]["hostvars"][node.name] = host_vars(spec, node)
    return out


def inventory_host(spec: ClusterSpec, host: str) -> dict[str, Any]:
    """The `--host H` document: that node's variables; an unknown name is an error naming the known ones."""
    for node in spec.nodes():
        if node.name == host:
            return host_vars(spec, node)
    for controller in spec.controller.hosts:
        if controller.name == host:
            return controller_host_vars(controller)
    names = [n.name for n in spec.nodes()] + [h.name for h in spec.controller.hosts]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    raise SpecError(spec.name, "host", f"a node of this cluster ({shown}), not {host!r}")
