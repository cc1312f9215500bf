"""The checkpoint interval to use, from the measured save cost and the observed MTBF.

Symbols as in Daly, "A higher order estimate of the optimum checkpoint interval for restart
dumps", Future Generation Computer Systems 22(3), 2006 (doi:10.1016/j.future.2004.11.016):
delta = time to save one checkpoint (here: how long training stands still for it),
M = mean time between failures the job sees, R = restart time, tau = compute time between
checkpoints.

* Young (1974), first order:  tau = sqrt(2 delta M)
* Daly (2006), higher order:  tau = sqrt(2 delta M) [1 + 1/3 sqrt(delta/2M) + 1/9 (delta/2M)] - delta
                              for delta < 2M, else tau = M
  (it matches Young's when delta << M and stays right when M is small: for delta = 5 min,
  R = 10 min the paper's model gives 117, 57 and 9.1 min at M = 24 h, 6 h, 15 min).
* Expected wall time per unit of work, Daly's complete model with Poisson failures:
      T_wall / T_solve = (M / tau) e^(R/M) (e^((tau + delta)/M) - 1)
  so the expected ETTR at interval tau is its inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aidc.errors import AidcError


class AdviceError(AidcError):
    """The advice lacks an input it cannot measure."""


def young_interval(delta_s: float, mtbf_s: float) -> float:
    return math.sqrt(2 * delta_s * mtbf_s)


def daly_interval(delta_s: float, mtbf_s: float) -> float:
    if delta_s >= 2 * mtbf_s:
        return mtbf_s
    xi = delta_s / (2 * mtbf_s)
    return math.sqrt(2 * delta_s * mtbf_s) * (1 + math.sqrt(xi) / 3 + xi / 9) - delta_s


def expected_ettr(tau_s: float, delta_s: float, mtbf_s: float, restart_s: float) -> float:
    """Daly's expected useful fraction of wall time at compute interval tau (Poisson failures)."""
    if tau_s <= 0:
        return 0.0
    # expm1 keeps precision when (tau + delta) << M, the usual case
    return tau_s / (mtbf_s * math.exp(restart_s / mtbf_s) * math.expm1((tau_s + delta_s) / mtbf_s))


@dataclass
class Mtbf:
    seconds: float
    source: str
    faults: int | None = None
    window_s: float | None = None
    fleet_nodes: int | None = None
    job_nodes: int | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def mtbf_from_audit(audit_db, job_nodes: int | None) -> Mtbf:
    """The MTBF a job of `job_nodes` nodes sees, from the fleet's fatal faults in the audit log.

    A fatal fault is one failover took a node out for (a `failover.decision` whose verdict is
    quarantine or would_quarantine). The fleet's rate is faults / observed window (first to last
    record); a job on a share of the fleet sees that share of it: MTBF_job = window x
    fleet_nodes / (faults x job_nodes)."""
    from aidc.audit import AuditLog

    try:
        log = AuditLog(audit_db, read_only=True)
    except AidcError as exc:
        raise AdviceError(f"MTBF: cannot read the audit log: {exc}") from None
    try:
        records = log.records()
    finally:
        log.close()
    fatal = [r for r in records if r.kind == "failover.decision"
             and r.payload.get("verdict") in ("quarantine", "would_quarantine",  # a GPU taken out alone too
                                              "quarantine_gpu", "would_quarantine_gpu")]
    nodes = {r.node for r in records if r.node}
    window = (records[-1].ts - records[0].ts) if len(records) > 1 else 0.0
    if not fatal or window <= 0:
        raise AdviceError(f"MTBF unknown: the audit log {audit_db} holds no fatal fault (a quarantine decision) "
                          f"over {window:.0f} s of history; give the fleet's MTBF with --mtbf-s SECONDS, or an audit "
                          "log with at least one")
    fleet = len(nodes) or 1
    job = min(job_nodes or fleet, fleet)
    return Mtbf(window * fleet / (len(fatal) * job), "audit", faults=len(fatal), window_s=window,
                fleet_nodes=fleet, job_nodes=job)


def advise(delta_s: float, mtbf: Mtbf, restart_s: float, current_tau_s: float | None,
           step_s: float | None = None) -> dict:
    """The advised interval (Daly's form; Young's beside it) and the expected ETTR at the
    current and the advised interval."""
    if delta_s <= 0:
        raise AdviceError("checkpoint save cost is 0: the step log has no checkpoint that stalled training")
    m = mtbf.seconds
    tau_daly, tau_young = daly_interval(delta_s, m), young_interval(delta_s, m)
    out = {
        "mtbf": mtbf.to_dict(), "save_cost_s": round(delta_s, 6), "restart_s": round(restart_s, 3),
        "advised_interval_s": round(tau_daly, 3), "young_interval_s": round(tau_young, 3),
        "method": "daly-2006",
        "expected_ettr_advised": round(expected_ettr(tau_daly, delta_s, m, restart_s), 4),
        "current_interval_s": None if current_tau_s is None else round(current_tau_s, 3),
        "expected_ettr_current": None if current_tau_s is None else
        round(expected_ettr(current_tau_s, delta_s, m, restart_s), 4),
    }
    if step_s:
        out["advised_interval_steps"] = max(1, round(tau_daly / step_s))
        out["step_s"] = round(step_s, 6)
    return out
