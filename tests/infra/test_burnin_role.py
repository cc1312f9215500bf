"""The Role `aidc burnin run` needs on a Kubernetes stack: the launcher's own rules, in its namespace."""

from __future__ import annotations

from aidc.burnin.launch.kubernetes import RBAC_RULES

BURNIN = "aidc:burnin:BurninRole"


def test_a_kubernetes_stack_gets_the_burnin_role_with_exactly_the_launchers_rules(h100):
    (role,) = [r for r in h100.of_type("kubernetes:rbac.authorization.k8s.io/v1:Role") if r.parent_type == BURNIN]
    assert role.inputs["metadata"]["name"] == "aidc-burnin"
    assert role.inputs["metadata"]["namespace"] == "aidc-system"
    assert role.inputs["rules"] == RBAC_RULES
    grants = {(r, v) for rule in role.inputs["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {("jobs", "create"), ("jobs", "list"), ("jobs", "delete"),
                      ("secrets", "create"), ("secrets", "delete")}


def test_a_stack_not_scheduled_by_kubernetes_gets_no_burnin_role(lab):
    assert [r for r in lab.of_type("kubernetes:rbac.authorization.k8s.io/v1:Role") if r.parent_type == BURNIN] == []
