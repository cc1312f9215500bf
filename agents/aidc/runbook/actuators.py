"""What runbook steps act through. Each is a small Protocol with one real implementation,
so the engine is tested with fakes and the real parts are wired in one place (`context.py`).

Integration points owned by other stages:
- `PlaybookRunner`: the ansible-runner wrapper (`aidc.ansible`).
- `BurninRunner`: the burn-in launchers (`aidc.burnin.launch`).
Where a part is missing, the implementation raises a clear `StepUnavailable`.
"""

from __future__ import annotations

import json
import operator
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from aidc.errors import AidcError
from aidc.failover.scheduler import SchedulerBackend
from aidc.files import private_dir, private_opener

HTTP_TIMEOUT_S = 5.0


class StepUnavailable(AidcError):
    """A step needs a part that this build or configuration does not have."""


class CheckFailed(AidcError):
    """A check could not be evaluated (source unreachable, bad answer)."""


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    detail: str
    data: dict = field(default_factory=dict)


@runtime_checkable
class PlaybookRunner(Protocol):
    def run(self, playbook: str, node: str, extravars: dict, timeout_s: float) -> ActionResult:
        """Run one playbook limited to `node`. Must be safe to call again after an interruption."""
        ...


@runtime_checkable
class BurninRunner(Protocol):
    def run(self, node: str, tests: list[str], timeout_s: float) -> ActionResult:
        """Burn in one node; ok=True when it is certified."""
        ...


@runtime_checkable
class Notifier(Protocol):
    def notify(self, severity: str, message: str, context: dict) -> None:
        ...


@runtime_checkable
class MetricsSource(Protocol):
    def prometheus(self, query: str, timeout_s: float) -> list[float]:
        """Values of an instant PromQL query (empty list: no series)."""
        ...

    def agent(self, node: str, metric: str, labels: dict, timeout_s: float) -> list[float]:
        """Values of one metric read straight from the node agent's /metrics."""
        ...


@dataclass
class Actuators:
    scheduler: SchedulerBackend
    metrics: MetricsSource
    playbooks: PlaybookRunner
    burnin: BurninRunner
    notifier: Notifier


# --- real implementations ------------------------------------------------------------


class AnsiblePlaybookRunner:
    """Runs remediation playbooks through the Ansible stage's ansible-runner wrapper.

    Integration point: `aidc.ansible.run_playbook(playbook, inventory=, extravars=, limit=,
    timeout_s=) -> PlaybookResult` (branch `ansible`). Ansible playbooks are idempotent by
    design; the engine still never re-runs one that was interrupted (outcome unknown).
    """

    def __init__(self, playbook_dir: Path, inventory: Path | str):
        self.playbook_dir, self.inventory = playbook_dir, inventory

    def run(self, playbook: str, node: str, extravars: dict, timeout_s: float) -> ActionResult:
        try:
            from aidc.ansible import run_playbook
        except ImportError:
            raise StepUnavailable("playbook steps need the ansible-runner wrapper (aidc.ansible), "
                                  "which this build does not include") from None
        result = run_playbook(self.playbook_dir / playbook, inventory=self.inventory, extravars=extravars,
                              limit=node, timeout_s=max(1, int(timeout_s)))
        return ActionResult(bool(result.ok), result.describe() or f"playbook {playbook}: {result.status}",
                            {"status": result.status, "changed": result.changed})


class StageBurninRunner:
    """Recertifies one node through the burn-in launcher of the stack's scheduler
    (aidc.burnin.launch: lab, slurm), the same node program `aidc burnin run --nodes NODE` runs.

    The node is burned in alone, so it has no fleet: it is judged against the stored baseline of
    its GPU model (aidc.burnin.baseline, `<lab-dir>/burnin-baselines.json`) and the spec's floors;
    without a baseline for its model it is not recertified (one line says how to record one). A
    scheduler that cannot run jobs on a quarantined node opens it to this job alone: Slurm's
    `recertification` window (a maintenance reservation only aidc may use; the node is drained
    again, with the failure's reasons when it failed, before the reservation goes). The step
    passes only on a passing certificate of this run in the signed audit log. The node program
    runs the tests the runbook lists (`tests`, aidc.burnin.suite; none listed: all of them) and is
    judged on those alone; the certificate and the step's result name them.
    """

    def __init__(self, spec, lab_dir: Path, audit=None, scheduler=None):
        self.spec, self.lab_dir, self.audit, self.scheduler = spec, lab_dir, audit, scheduler

    def run(self, node: str, tests: list[str], timeout_s: float) -> ActionResult:
        from contextlib import nullcontext

        from aidc.burnin import baseline
        from aidc.burnin.launch import launcher_for, select_nodes
        from aidc.burnin.suite import select as select_tests
        from aidc.errors import BurninError

        try:
            launcher = launcher_for(self.spec.scheduler)
        except BurninError as exc:
            raise StepUnavailable(str(exc)) from None
        selected = select_nodes(self.spec, node)
        model = selected[0].gpu_model
        if model not in baseline.load(baseline.path_for(self.lab_dir)):
            return ActionResult(False, f"no stored burn-in baseline for GPU model {model}: {node} burned in alone"
                                f" has no fleet to be judged against (record one from a certified run:"
                                f" aidc burnin baseline record --stack {self.spec.name} --lab-dir {self.lab_dir})",
                                {"tests": tests})
        window = getattr(self.scheduler, "recertification", None)
        with (window(node) if window else nullcontext()) as opened:
            spec = self.spec
            if opened is not None:  # the job must ask for the reservation that holds the node
                burnin = spec.slurm.burnin.model_copy(update={"reservation": opened.reservation})
                spec = spec.model_copy(update={"slurm": spec.slurm.model_copy(update={"burnin": burnin})})
            since = self.audit.records(kind="burnin.certificate", node=node) if self.audit is not None else []
            result = launcher.run(spec, selected, lab_dir=self.lab_dir, audit=self.audit, progress=False,
                                  timeout_s=timeout_s, say=lambda msg: print(msg, file=sys.stderr, flush=True),
                                  tests=tests or None)
            verdict = result.report.nodes.get(node)
            passed = bool(verdict is not None and verdict.passed)
            reasons = list(verdict.reasons) if verdict is not None else [f"burn-in report has no result for {node}"]
            signed = self._certificate(node, len(since))
            if passed and (self.audit is not None and (signed is None or signed.payload.get("verdict") != "pass")):
                passed, reasons = False, [f"no passing certificate of this burn-in for {node} in the audit log"]
            elif passed and signed is not None and signed.payload.get("tests") != list(select_tests(tests or None)):
                passed, reasons = False, [f"the certificate of {node} does not name the tests the runbook asked for"]
            elif passed and signed is not None and not signed.payload.get("baseline"):
                # Fail closed: a lone node's pass judged without its baseline (floors only) proves nothing.
                passed, reasons = False, [f"the {launcher.name} launcher did not judge {node} against the stored"
                                          f" {model} baseline"]
            if opened is not None and not passed:
                opened.failed(reasons)
        data = {"verdict": "pass" if passed else "fail", "reasons": reasons,
                "failed_gpus": list(getattr(verdict, "failed_gpus", []) or []),
                "tests": list(select_tests(tests or None)),
                "launcher": launcher.name, "job_id": result.job_id,
                **({"reservation": opened.reservation} if opened is not None else {}),
                **({"certificate_seq": signed.seq} if signed is not None else {})}
        return ActionResult(passed, f"burn-in of {node}: {'certified' if passed else 'FAILED'}"
                            + (f" ({'; '.join(reasons)})" if reasons else ""), data)

    def recover(self, node: str) -> dict:
        """After a restart interrupted this step: close what it had opened to run the node (Slurm:
        the maintenance reservation the node was resumed into), so the node is out again."""
        close = getattr(self.scheduler, "close_interrupted_recertification", None)
        closed = close(node) if close else None
        return {"closed_reservation": closed} if closed else {}

    def _certificate(self, node: str, before: int):
        """This run's certificate of `node`: the first one after the `before` it had already."""
        if self.audit is None:
            return None
        certs = self.audit.records(kind="burnin.certificate", node=node)
        return certs[before] if len(certs) > before else None


class LogNotifier:
    """Writes notifications to stderr and, when given, one JSON object per line to a file
    (the place a pager or chat integration reads from)."""

    def __init__(self, path: Path | None = None):
        self.path = path

    def notify(self, severity: str, message: str, context: dict) -> None:
        line = {"ts": time.time(), "severity": severity, "message": message, **context}
        print(f"aidc runbook notify [{severity}] {message}", file=sys.stderr, flush=True)
        if self.path:
            private_dir(self.path.parent)
            with open(self.path, "a", opener=private_opener) as f:
                f.write(json.dumps(line, sort_keys=True, default=str) + "\n")


class HttpMetrics:
    """Reads Prometheus' HTTP API and the agents' /metrics pages."""

    def __init__(self, prometheus_url: str | None, agent_url: Callable[[str], str] | None):
        self.prometheus_url = prometheus_url.rstrip("/") if prometheus_url else None
        self.agent_url = agent_url

    def prometheus(self, query: str, timeout_s: float) -> list[float]:
        if not self.prometheus_url:
            raise StepUnavailable("check step needs Prometheus: pass --prometheus URL")
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            with urllib.request.urlopen(url, timeout=min(timeout_s, HTTP_TIMEOUT_S)) as resp:
                body = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise CheckFailed(f"Prometheus query {query!r} failed: {exc}") from None
        if body.get("status") != "success":
            raise CheckFailed(f"Prometheus query {query!r}: {body.get('error', 'no success status')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(r["value"][1]) for r in data["result"]]

    def agent(self, node: str, metric: str, labels: dict, timeout_s: float) -> list[float]:
        from prometheus_client.parser import text_string_to_metric_families

        if not self.agent_url:
            raise StepUnavailable("check step needs the agent's address")
        url = self.agent_url(node)
        try:
            with urllib.request.urlopen(url, timeout=min(timeout_s, HTTP_TIMEOUT_S)) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            raise CheckFailed(f"agent of {node} at {url} unreachable: {exc}") from None
        out = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                    out.append(float(sample.value))
        return out


# --- check expectations --------------------------------------------------------------

_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_COMPARE = re.compile(r"^(==|!=|>=|<=|>|<) ?(-?[0-9]+(?:\.[0-9]+)?)$")


def expectation_met(expect: str, values: list[float] | str) -> bool:
    """`empty` / `nonempty` / `> 0` over query values, or a scheduler state by name."""
    if isinstance(values, str):
        return values == expect
    if expect == "empty":
        return not values
    if expect == "nonempty":
        return bool(values)
    m = _COMPARE.match(expect)
    if not m:
        raise CheckFailed(f"expectation {expect!r} does not apply to metric values")
    op, ref = _OPS[m.group(1)], float(m.group(2))
    return any(op(v, ref) for v in values)
