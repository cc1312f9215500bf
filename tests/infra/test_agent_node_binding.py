"""Each agent writes only its own node, as kubelet's NodeRestriction binds a kubelet: RBAC lets the
agent's service account patch any node's status, so a ValidatingAdmissionPolicy denies a write to
a node other than the one named in the pod's token (`authentication.kubernetes.io/node-name`).

The policy is rendered by the Pulumi program, checked against the API schema, and its CEL is
evaluated on admission requests (cel_admission.py) as the API server would."""

from __future__ import annotations

import pytest
from cel_admission import admit
from pulumi_harness import ROOT, build_of
from hypothesis import given, settings
from hypothesis import strategies as st
from pulumi_schema_check import builtin_errors

from aidc.spec import load_stack

STACKS = ["Pulumi.h100-example.yaml", "Pulumi.lab.yaml", "tests/infra/stacks/Pulumi.capi-roce.yaml"]
POLICY = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicy"
BINDING = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicyBinding"
NODE_NAME = "authentication.kubernetes.io/node-name"
NODE = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,30}[a-z0-9])?", fullmatch=True)


def _rendered(stack: str = STACKS[0]):
    build = build_of(ROOT / stack)
    [account] = [r.k8s_object for r in build.of_type("kubernetes:core/v1:ServiceAccount")
                 if r.k8s_object["metadata"]["name"] == "aidc-agent"]
    return build.one(POLICY).k8s_object, build.one(BINDING).k8s_object, account


def _user(account: dict, node: str | None) -> dict:
    meta = account["metadata"]
    extra = {"authentication.kubernetes.io/pod-name": ["aidc-agent-x7k2p"]}
    if node is not None:
        extra[NODE_NAME] = [node]
    return {"username": f"system:serviceaccount:{meta['namespace']}:{meta['name']}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{meta['namespace']}",
                       "system:authenticated"], "extra": extra}


def _node_status_patch(user: dict, node: str) -> tuple[dict, dict]:
    request = {"operation": "UPDATE", "resource": {"group": "", "version": "v1", "resource": "nodes"},
               "subResource": "status", "name": node, "userInfo": user}
    obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
           "status": {"conditions": [{"type": "AidcGpuHealthy", "status": "False", "reason": "Xid79"}]}}
    return request, obj


def _event_create(user: dict, kind: str, name: str) -> tuple[dict, dict]:
    request = {"operation": "CREATE", "resource": {"group": "", "version": "v1", "resource": "events"},
               "namespace": "default", "name": f"{name}.aidc-1", "userInfo": user}
    obj = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.aidc-1", "namespace": "default"},
           "involvedObject": {"apiVersion": "v1", "kind": kind, "name": name}, "reason": "Xid79", "type": "Warning"}
    return request, obj


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_binds_its_agents_to_their_nodes_with_a_schema_valid_policy(stack):
    policy, binding, _ = _rendered(stack)
    version = load_stack(ROOT / stack).software.kubernetes_minor
    assert builtin_errors(policy, version) == [] and builtin_errors(binding, version) == []
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert "Deny" in binding["spec"]["validationActions"]
    assert policy["spec"].get("failurePolicy", "Fail") == "Fail"  # an error in the policy denies


def test_an_agent_may_patch_the_status_of_its_own_node():
    policy, _, account = _rendered()
    verdict = admit(policy, *_node_status_patch(_user(account, "gpu-node-7"), "gpu-node-7"))
    assert verdict.applies and verdict.allowed


@pytest.mark.parametrize("target", ["gpu-node-8", "gpu-node-70", "gpu-node", "GPU-NODE-7"])
def test_an_agent_may_not_patch_the_status_of_another_node(target):
    policy, _, account = _rendered()
    verdict = admit(policy, *_node_status_patch(_user(account, "gpu-node-7"), target))
    assert verdict.applies and not verdict.allowed


def test_a_token_without_a_node_is_denied_not_waved_through():
    policy, _, account = _rendered()
    verdict = admit(policy, *_node_status_patch(_user(account, None), "gpu-node-7"))
    assert not verdict.allowed


def test_the_policy_leaves_other_accounts_to_their_own_rbac():
    policy, _, account = _rendered()
    controller = {**_user(account, "gpu-node-1"), "username": "system:serviceaccount:aidc-system:aidc-failover"}
    assert admit(policy, *_node_status_patch(controller, "gpu-node-7")).applies is False
    kubelet = {"username": "system:node:gpu-node-7", "groups": ["system:nodes"], "extra": {}}
    assert admit(policy, *_node_status_patch(kubelet, "gpu-node-7")).applies is False


@pytest.mark.parametrize("kind, name, allowed", [("Node", "gpu-node-7", True), ("Node", "gpu-node-8", False),
                                                 ("Pod", "gpu-node-7", False)])
def test_an_agent_creates_events_only_about_its_own_node(kind, name, allowed):
    policy, _, account = _rendered()
    verdict = admit(policy, *_event_create(_user(account, "gpu-node-7"), kind, name))
    assert verdict.applies and verdict.allowed is allowed


@settings(max_examples=40, deadline=None)
@given(NODE, NODE)
def test_an_agent_writes_a_node_if_and_only_if_its_token_names_that_node(own, target):
    policy, _, account = _rendered()
    assert admit(policy, *_node_status_patch(_user(account, own), target)).allowed is (own == target)
    assert admit(policy, *_event_create(_user(account, own), "Node", target)).allowed is (own == target)
