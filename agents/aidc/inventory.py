"""Ansible inventory generated from the cluster spec.

`aidc inventory --stack NAME --list` prints what Ansible's dynamic-inventory protocol expects:
one group per node pool (`pool_<name>`, dashes turned into underscores because Ansible warns
about dashes in group names), a `spares` group, cluster-wide facts in `all.vars`, and per-host
facts under `_meta.hostvars` so Ansible never has to call `--host` once per node.

Every variable the playbooks read about the cluster comes from here, so the playbooks cannot
drift from the spec: a node's expected GPU count, model, fabric rails and HCAs, the software
versions and the agent's settings are all the spec's values.
"""

from __future__ import annotations

from typing import Any

from aidc.errors import SpecError
from aidc.spec import ClusterSpec, Node, gpu_models

SPARES_GROUP = "spares"


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
    }


def inventory_list(spec: ClusterSpec) -> dict[str, Any]:
    """The `--list` document of Ansible's dynamic-inventory protocol."""
    out: dict[str, Any] = {
        "all": {"children": [pool_group(p.name) for p in spec.node_pools] + [SPARES_GROUP],
                "vars": cluster_vars(spec)},
        SPARES_GROUP: {"hosts": []},
        "_meta": {"hostvars": {}},
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
    names = [n.name for n in spec.nodes()]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    raise SpecError(spec.name, "host", f"a node of this cluster ({shown}), not {host!r}")
