"""Wiring: build an Engine with the real actuators from the cluster spec and command options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aidc.audit.log import AuditLog, default_actor
from aidc.failover.backends import check_backend, open_scheduler
from aidc.failover.scheduler import SchedulerBackend
from aidc.runbook.actuators import Actuators, AnsiblePlaybookRunner, HttpMetrics, StageBurninRunner
from aidc.runbook.catalog import Catalog
from aidc.runbook.engine import Engine
from aidc.runbook.notifiers import notifier_from_spec
from aidc.shipped import project_file
from aidc.spec import ClusterSpec, load_stack, project_root
from aidc.state import audit_log_for, run_state_for


@dataclass
class EngineOptions:
    stack: str = "lab"
    lab_dir: Path = Path(".aidc/lab")
    state_db: Path = Path(".aidc/runbook/state.db")
    audit_db: Path = Path(".aidc/lab/audit.db")
    runbooks: Path | None = None
    prometheus: str | None = None
    notify_file: Path | None = None
    inventory: Path | None = None
    # The failover store whose escalation history and circuit breaker runbook quarantines share
    # (aidc.failover.remediation); None: LAB_DIR/state.db when it exists, else none.
    remediation_db: Path | None = None
    # A spec.State that replaces the stack's `state:` (the CLI's --state); None: the stack's.
    state: object | None = None


def scheduler_for(spec: ClusterSpec, lab_dir: Path, audit: AuditLog | None = None) -> SchedulerBackend:
    # The runbook's quarantine steps stop the lab node but leave the rendezvous to notice by
    # itself (the failover controller is the one that tells it at once).
    return open_scheduler(spec, lab_dir, audit=audit, actor=default_actor("runbook"), tell_rendezvous=False)


def agent_url_for(spec: ClusterSpec):
    """The lab convention (docs/metrics.md): node i's agent serves on metrics_port + i."""
    index = {n.name: i for i, n in enumerate(spec.nodes())}

    def url(node: str) -> str:
        return f"http://127.0.0.1:{spec.agent.metrics_port + index[node]}/metrics"

    return url


def build_engine(opts: EngineOptions) -> Engine:
    spec = load_stack(opts.stack)
    if opts.state is not None:
        spec = spec.model_copy(update={"state": opts.state})
    check_backend(spec)
    catalog = Catalog.load(opts.runbooks)
    # The stack's `state:` names where runs and the audit log live: these files, or PostgreSQL.
    audit = audit_log_for(spec.state, opts.audit_db)
    scheduler = scheduler_for(spec, opts.lab_dir, audit)
    # Kubernetes names nodes after hosts, not after the spec's pools: ask the cluster which
    # nodes are aidc's. Elsewhere the spec's node names are the scheduler's.
    managed = getattr(scheduler, "managed_nodes", None)
    nodes = managed() if managed else [n.name for n in spec.nodes()]
    actuators = Actuators(
        scheduler=scheduler,
        metrics=HttpMetrics(opts.prometheus, agent_url_for(spec)),
        playbooks=AnsiblePlaybookRunner(project_file("playbooks", project_root()),
                                        opts.inventory or project_file("playbooks/inventory/aidc_spec.sh", project_root())),
        burnin=StageBurninRunner(spec, opts.lab_dir, audit, scheduler),
        notifier=notifier_from_spec(spec, opts.notify_file),
    )
    return Engine(catalog=catalog, state=run_state_for(spec.state, opts.state_db), audit=audit,
                  actuators=actuators, nodes=nodes, policy=spec.policy,
                  access_roles=dict(spec.access.roles), remediation=remediation_gate(spec, opts))


def remediation_gate(spec: ClusterSpec, opts: EngineOptions):
    """The gate failover uses, on the same store, so both count one breaker window and one
    remediation history per node; its own audit connection (executor threads take its lock)."""
    from aidc.failover.remediation import RemediationGate
    from aidc.store import Store

    path = opts.remediation_db or opts.lab_dir / "state.db"
    if opts.remediation_db is None and spec.state.backend != "sqlite":
        from aidc.state import event_store_for

        return RemediationGate(spec, event_store_for(spec.state, path), audit_log_for(spec.state, opts.audit_db),
                               actor=default_actor("runbook"))
    if opts.remediation_db is None and not path.exists():
        return None
    return RemediationGate(spec, Store(path), AuditLog(opts.audit_db), actor=default_actor("runbook"))
