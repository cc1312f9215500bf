"""The two namespaces aidc owns: the agent's, and the one training jobs and their volumes use."""

from __future__ import annotations

import pulumi
from pulumi_kubernetes.core.v1 import Namespace

from aidc_infra.common import AGENT_NAMESPACE, PKG, TRAINING_NAMESPACE, managed_labels


class Namespaces(pulumi.ComponentResource):
    def __init__(self, name: str, opts: pulumi.ResourceOptions | None = None):
        super().__init__(f"{PKG}:namespaces:Namespaces", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.agent = Namespace(f"{name}-agent", metadata={"name": AGENT_NAMESPACE,
                                                          "labels": managed_labels("agent")}, opts=child)
        self.training = Namespace(f"{name}-training", metadata={"name": TRAINING_NAMESPACE,
                                                                "labels": managed_labels("training")}, opts=child)
        self.register_outputs({})
