"""How each step kind acts, and how it describes what it would do (dry-run).

Every function here gets a `StepContext` and returns `(ok, result)`; the engine owns state,
audit and ordering. Destructive actions are idempotent at the actuator (quarantining a
quarantined node is a no-op), which is what makes resuming after a crash safe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from aidc.errors import AidcError
from aidc.runbook.actuators import Actuators, expectation_met
from aidc.runbook.catalog import Runbook, Step, expand
from aidc.runbook.notifiers import NotifyError


class Interrupted(Exception):
    """The engine is stopping; the step stays `running` and resumes after restart."""


@dataclass
class StepContext:
    run_id: int
    runbook: Runbook
    node: str
    step: Step
    params: dict          # the step's fields with ${...} filled in
    started_at: float     # when the step first started (survives restarts)
    actuators: Actuators
    stop: threading.Event

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.started_at + self.step.timeout_s - time.time())


def scheduler_state(actuators: Actuators, node: str) -> str:
    try:
        return actuators.scheduler.state(node)
    except (KeyError, AidcError):  # an unknown node, or a scheduler that does not answer (slurmctld down)
        return "unknown"


def evaluate_check(ctx: StepContext, spec: dict) -> tuple[bool, dict]:
    source, expect = spec["source"], spec["expect"]
    timeout = max(ctx.remaining_s, 1.0)
    if source == "prometheus":
        values = ctx.actuators.metrics.prometheus(spec["query"], timeout)
        return expectation_met(expect, values), {"source": source, "query": spec["query"], "values": values,
                                                 "expect": expect}
    if source == "agent":
        values = ctx.actuators.metrics.agent(ctx.node, spec["metric"], spec.get("labels", {}), timeout)
        return expectation_met(expect, values), {"source": source, "metric": spec["metric"], "values": values,
                                                 "expect": expect}
    state = scheduler_state(ctx.actuators, ctx.node)
    return expectation_met(expect, state), {"source": source, "state": state, "expect": expect}


def run_check(ctx: StepContext) -> tuple[bool, dict]:
    return evaluate_check(ctx, ctx.params)


def run_wait(ctx: StepContext) -> tuple[bool, dict]:
    if "until" in ctx.params:
        poll = float(ctx.params.get("poll_s", 1.0))
        last: dict = {}
        # Bounded: the step's timeout (counted from its first start, across restarts).
        while True:
            try:
                met, last = evaluate_check(ctx, ctx.params["until"])
            except Exception as exc:  # a source that is down while a node reboots is expected
                met, last = False, {"error": str(exc)}
            if met:
                return True, {"waited_s": round(time.time() - ctx.started_at, 3), **last}
            if ctx.remaining_s <= 0:
                return False, {"error": f"condition not met within {ctx.step.timeout_s:g} s", **last}
            if ctx.stop.wait(min(poll, ctx.remaining_s)):
                raise Interrupted()
    seconds = float(ctx.params["seconds"])
    remaining = ctx.started_at + seconds - time.time()
    if remaining > 0 and ctx.stop.wait(remaining):
        raise Interrupted()
    return True, {"waited_s": seconds}


def run_quarantine(ctx: StepContext) -> tuple[bool, dict]:
    before = scheduler_state(ctx.actuators, ctx.node)
    # A backend reports what a best-effort part of the drain could not do (the rendezvous
    # eviction, say): the node is out either way, and the warning goes into the audited result.
    warning = ctx.actuators.scheduler.quarantine(ctx.node, ctx.params["reason"], event=f"run-{ctx.run_id}")
    after = scheduler_state(ctx.actuators, ctx.node)
    result = {"scheduler": ctx.actuators.scheduler.name, "before": before, "after": after}
    if warning:
        result["warning"] = warning
    return after == "quarantined", result


def run_release(ctx: StepContext) -> tuple[bool, dict]:
    before = scheduler_state(ctx.actuators, ctx.node)
    # A backend that will not release (Slurm: a node aidc did not drain) raises an AidcError
    # naming its decision; the engine fails the step with that message.
    result = {"scheduler": ctx.actuators.scheduler.name, "before": before}
    try:
        decision = ctx.actuators.scheduler.release(ctx.node, ctx.params["reason"])
    except AidcError as exc:
        refused = getattr(exc, "decision", None)
        if refused is None:
            raise
        return False, {**result, "after": before, "error": str(exc), "decision": refused.to_dict()}
    after = scheduler_state(ctx.actuators, ctx.node)
    if hasattr(decision, "to_dict"):
        result["decision"] = decision.to_dict()
    return after == "in_service", {**result, "after": after}


def run_playbook(ctx: StepContext) -> tuple[bool, dict]:
    res = ctx.actuators.playbooks.run(ctx.params["playbook"], ctx.node, ctx.params.get("extravars", {}),
                                      ctx.remaining_s or ctx.step.timeout_s)
    return res.ok, {"playbook": ctx.params["playbook"], "detail": res.detail, **res.data}


def run_burnin(ctx: StepContext) -> tuple[bool, dict]:
    res = ctx.actuators.burnin.run(ctx.node, ctx.params.get("tests", []), ctx.remaining_s or ctx.step.timeout_s)
    return res.ok, {"detail": res.detail, **res.data}


def run_notify(ctx: StepContext) -> tuple[bool, dict]:
    severity = ctx.params.get("severity", "warning")
    said = {"severity": severity, "message": ctx.params["message"]}
    try:
        ctx.actuators.notifier.notify(severity, ctx.params["message"],
                                      {"run_id": ctx.run_id, "runbook": ctx.runbook.name, "node": ctx.node})
    except NotifyError as exc:  # a page that did not go out is a failed step, said as such
        return False, {**said, "error": str(exc)}
    return True, said


ACTIONS = {
    "check": run_check, "wait": run_wait, "quarantine": run_quarantine, "release": run_release,
    "playbook": run_playbook, "burnin": run_burnin, "notify": run_notify,
}


# --- dry-run descriptions --------------------------------------------------------------

def _check_text(spec: dict, node: str, actuators: Actuators | None) -> str:
    if spec["source"] == "prometheus":
        return f"query Prometheus `{spec['query']}` and expect {spec['expect']}"
    if spec["source"] == "agent":
        labels = ",".join(f'{k}="{v}"' for k, v in spec.get("labels", {}).items())
        return f"read {spec['metric']}{{{labels}}} from the agent of {node} and expect {spec['expect']}"
    now = f" (now: {scheduler_state(actuators, node)})" if actuators else ""
    return f"ask the scheduler whether {node} is {spec['expect']}{now}"


def describe(step: Step, params: dict, node: str, actuators: Actuators | None) -> str:
    kind = step.kind
    sched = f"the {actuators.scheduler.name} scheduler" if actuators else "the scheduler"
    if kind == "check":
        return _check_text(params, node, actuators)
    if kind == "wait":
        if "until" in params:
            return (f"wait until: {_check_text(params['until'], node, actuators)} "
                    f"(poll every {params.get('poll_s', 1.0):g} s, give up after {step.timeout_s:g} s)")
        return f"wait {float(params['seconds']):g} s"
    if kind == "quarantine":
        return f"take {node} out of service through {sched} (reason: {params['reason']})"
    if kind == "release":
        return f"return {node} to service through {sched} (reason: {params['reason']})"
    if kind == "playbook":
        extra = f" with extravars {params['extravars']}" if params.get("extravars") else ""
        return f"run playbook {params['playbook']} limited to {node}{extra}"
    if kind == "burnin":
        tests = ", ".join(params.get("tests", [])) or "all tests"
        return f"burn in {node} ({tests}) and require certification"
    if kind == "approve":
        return f"pause until a human approves: {params['prompt']}"
    if kind == "notify":
        return f"notify on-call [{params.get('severity', 'warning')}]: {params['message']}"
    raise ValueError(kind)


def step_params(step: Step, variables: dict) -> dict:
    params = expand(dict(step.raw), variables)
    if "extravars" in step.raw:
        # Playbook variables keep their declared types (gpu: 3, not "3").
        params["extravars"] = expand(step.raw["extravars"], variables, typed=True)
    return params
