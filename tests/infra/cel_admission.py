"""Evaluate a ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) as the API server does,
with a CEL library, for one admission request: no API server with admission runs on these machines.

What the API server does, and only that: match the request against `matchConstraints`
(resource rules: API group, version, resource or `resource/subresource`, operation), then every
`matchCondition` must be true for the policy to apply, then `variables` are evaluated in order
(each may use the ones before it as `variables.<name>`), then every validation must be true. An
expression that errors counts as a failure, which `failurePolicy: Fail` turns into a denial.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import celpy


@dataclass(frozen=True)
class Verdict:
    applies: bool
    allowed: bool
    message: str = ""


@lru_cache(maxsize=256)
def _program(expression: str):
    env = celpy.Environment()
    return env.program(env.compile(expression))


def _evaluate(expression: str, activation: dict):
    return _program(expression).evaluate(activation)


def _matches(rules: list[dict], request: dict) -> bool:
    resource = request["resource"]
    name = resource["resource"] + (f"/{request['subResource']}" if request.get("subResource") else "")
    for rule in rules:
        if (resource["group"] in rule["apiGroups"] and resource["version"] in rule["apiVersions"]
                and name in rule["resources"] and request["operation"] in rule["operations"]):
            return True
    return False


def admit(policy: dict, request: dict, obj: dict | None, old: dict | None = None) -> Verdict:
    """The policy's verdict on one request (`request` as in an AdmissionReview, without `object`)."""
    spec = policy["spec"]
    if not _matches(spec["matchConstraints"]["resourceRules"], request):
        return Verdict(applies=False, allowed=True)
    activation = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(obj),
                  "oldObject": celpy.json_to_cel(old)}
    failure_denies = spec.get("failurePolicy", "Fail") == "Fail"
    for cond in spec.get("matchConditions", []):
        result = _evaluate(cond["expression"], activation)
        if isinstance(result, celpy.CELEvalError):
            return Verdict(applies=True, allowed=not failure_denies, message=f"{cond['name']}: {result}")
        if not result:
            return Verdict(applies=False, allowed=True)
    variables = celpy.celtypes.MapType()
    for var in spec.get("variables", []):
        activation["variables"] = variables
        variables[celpy.celtypes.StringType(var["name"])] = _evaluate(var["expression"], activation)
    activation["variables"] = variables
    for rule in spec["validations"]:
        result = _evaluate(rule["expression"], activation)
        if isinstance(result, celpy.CELEvalError):
            if failure_denies:
                return Verdict(applies=True, allowed=False, message=f"{rule['expression']}: {result}")
            continue
        if not result:
            return Verdict(applies=True, allowed=False, message=rule.get("message", rule["expression"]))
    return Verdict(applies=True, allowed=True)
