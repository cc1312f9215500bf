"""What the health API answers about the fleet, a node and one GPU, read through the store and
the audit log (never written): the replayed standing (aidc.fleet.figure), the store's node state,
the open fault events, the quarantine (who and why, from the audit record that did it), the last
burn-in certificate signed for export (aidc.burnin.certificate) and the repeat-offender state.

Open events: a node's fault events recorded after its last return to service (or ever, if it
never left), except those failover decided need no action; for a GPU, those naming that GPU.

Repeat offenders are failover's (aidc.failover.offenders, policy.offenders): `repeat_offender` is
the mark of the node or GPU (or, for a GPU, its node's), null when neither offends.
"""

from __future__ import annotations

from aidc.failover.offenders import offender_state
from aidc.fleet.figure import Replay, Standing

# Outcomes that close an event without a quarantine: the fault needs nothing, or it was not a
# fault this cluster may act on (another node's key, a name that is no node).
CLOSED_OUTCOMES = ("no_action", "refused_unknown_node", "refused_source")
TRACKED_BY = "policy.offenders"


class NotFound(Exception):
    pass


def _event(event_id: int, event, outcome: str | None) -> dict:
    return {"id": event_id, "kind": event.kind.value, "action": event.action.value, "gpu": event.gpu,
            "xid": event.xid, "message": event.message, "observed_at": event.observed_at,
            "outcome": outcome, "decided": outcome is not None}


def open_events(store, standing: Standing, gpu: int | None = None) -> list[dict]:
    since = standing.returned_at or 0.0
    out = []
    for event_id, event, outcome in store.events(standing.node):
        if outcome in CLOSED_OUTCOMES or event.observed_at < since:
            continue
        if gpu is not None and event.gpu != gpu:
            continue
        out.append(_event(event_id, event, outcome))
    return out


def _repeat_offender(store, node: str, gpu: int | None = None) -> dict:
    return {"repeat_offender": offender_state(store, node, gpu), "repeat_offender_tracking": TRACKED_BY}


def node_summary(store, standing: Standing) -> dict:
    return {**standing.to_dict(), "scheduler_state": store.node_state(standing.node),
            "open_events": len(open_events(store, standing)), **_repeat_offender(store, standing.node)}


def fleet_view(replay: Replay, now: float, store) -> dict:
    standings = replay.standings.values()
    return {**replay.answer(now), "nodes": len(replay.standings),
            "nodes_by_health": _count(s.health for s in standings),
            "open_events": sum(len(open_events(store, s)) for s in standings)}


def _count(words) -> dict:
    out: dict[str, int] = {}
    for word in words:
        out[word] = out.get(word, 0) + 1
    return out


def standing_of(replay: Replay, node: str) -> Standing:
    standing = replay.standings.get(node)
    if standing is None:
        raise NotFound(f"no node {node!r} in this cluster")
    return standing


def node_view(replay: Replay, store, node: str, certificate) -> dict:
    """`certificate(node)` -> (signed document or None, why it is missing or None)."""
    standing = standing_of(replay, node)
    document, missing = certificate(node)
    return {**node_summary(store, standing), "open_events": open_events(store, standing),
            "gpu_health": [gpu_health(standing, index) for index in range(standing.gpus)],
            "certificate": document, "certificate_missing": missing}


def gpu_health(standing: Standing, index: int) -> dict:
    certified = index in standing.certified_gpus()
    in_service = index in standing.in_service_gpus()
    if not in_service:
        word = "quarantined"
    elif not certified:
        word = "uncertified" if standing.verdict != "pass" else "failed_burnin"
    else:
        word = "healthy"
    return {"index": index, "health": word, "certified": certified, "in_service": in_service,
            "quarantined": not in_service}


def gpu_view(replay: Replay, store, node: str, index: int, certificate) -> dict:
    standing = standing_of(replay, node)
    if not 0 <= index < standing.gpus:
        raise NotFound(f"node {node!r} has GPUs 0 to {standing.gpus - 1}, not {index}")
    document, missing = certificate(node)
    quarantine = standing.out_record if (standing.node_out or index in standing.gpus_out) else None
    return {"node": node, "pool": standing.pool, **gpu_health(standing, index), "quarantine": quarantine,
            "open_events": open_events(store, standing, gpu=index), "certificate": document,
            "certificate_missing": missing, **_repeat_offender(store, node, index)}
