"""Bind each node agent to its own node, as kubelet's NodeRestriction binds a kubelet.

RBAC cannot say "your node": the agent's ClusterRole lets its service account patch the status
of every node and create Events about anything. A ValidatingAdmissionPolicy closes that: the
token of a pod bound to a node carries the node's name in `request.userInfo.extra`
(`authentication.kubernetes.io/node-name`, Kubernetes 1.30+), and a node status write or an Event
by the agent's service account is denied unless it is about that node. A token without the node
name is denied too (fail closed), and so is any error in the policy (`failurePolicy: Fail`).
The failover controller checks the same thing on what it reads (aidc.failover.provenance).
"""

from __future__ import annotations

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POLICY_NAME = "aidc-agent-own-node"

_NODE = (f"has(request.userInfo.extra) && '{NODE_NAME_EXTRA}' in request.userInfo.extra"
         f" && size(request.userInfo.extra['{NODE_NAME_EXTRA}']) == 1"
         f" ? request.userInfo.extra['{NODE_NAME_EXTRA}'][0] : ''")


def policy_spec(service_account: str, namespace: str) -> dict:
    """The policy for the agent's service account `namespace/service_account`."""
    user = f"system:serviceaccount:{namespace}:{service_account}"
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": [
            # A PATCH is an UPDATE to admission; the agent's RBAC grants no other node write.
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
             "resources": ["nodes", "nodes/status"]},
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["events"]},
        ]},
        "matchConditions": [{"name": "aidc-agent-service-account",
                             "expression": f"request.userInfo.username == '{user}'"}],
        "variables": [{"name": "nodeName", "expression": _NODE}],
        "validations": [
            {"expression": "variables.nodeName != ''", "reason": "Forbidden",
             "message": f"the aidc agent's token names no node ({NODE_NAME_EXTRA}): it may write no node"},
            {"expression": "request.resource.resource != 'nodes' || object.metadata.name == variables.nodeName",
             "reason": "Forbidden", "message": "an aidc agent may write only the status of its own node"},
            {"expression": "request.resource.resource != 'events' || (has(object.involvedObject.kind)"
                           " && has(object.involvedObject.name) && object.involvedObject.kind == 'Node'"
                           " && object.involvedObject.name == variables.nodeName)",
             "reason": "Forbidden", "message": "an aidc agent may create Events only about its own node"},
        ],
    }


def binding_spec() -> dict:
    # Deny, and Audit so that the API server's audit log records each denial with the policy's name.
    return {"policyName": POLICY_NAME, "validationActions": ["Deny", "Audit"]}
