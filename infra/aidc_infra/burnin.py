"""What `aidc burnin run` needs on a Kubernetes cluster: a Role in the stack's namespace.

The burn-in's Jobs (aidc.burnin.launch.kubernetes) are created by whoever runs the command, not
by the controller, so the Role is rendered here and bound by the operator to the user or
service account that runs burn-ins (`kubectl create rolebinding ... --role=aidc-burnin`). Its
rules are the launcher's own `RBAC_RULES`: the calls it makes, no more.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_kubernetes.rbac.v1 import Role

from aidc.burnin.launch.kubernetes import RBAC_RULES
from aidc.spec import ClusterSpec
from aidc_infra.common import PKG, managed_labels

ROLE = "aidc-burnin"


@dataclass(frozen=True)
class BurninRoleArgs:
    spec: ClusterSpec


class BurninRole(pulumi.ComponentResource):
    def __init__(self, name: str, args: BurninRoleArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:burnin:BurninRole", name, None, opts)
        self.role = Role(f"{name}-burnin-role",
                         metadata={"name": ROLE, "namespace": args.spec.kubernetes.namespace,
                                   "labels": {**managed_labels("burnin"), "app.kubernetes.io/name": ROLE}},
                         rules=RBAC_RULES, opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({"role": ROLE})
