"""A node speaks only for itself: who may report a fault of which node.

A fault's key is `<node>:<store id>:<event id>`, made by the store of the agent that observed it
(aidc.store.Store.append), so the key names the fault's source. Node names never hold a ':'
(DNS names), so the source is the key's text before its first ':'. Each transport knows who
handed it a fault and checks that against the node the fault names:

* HTTPS ingest: the client certificate's names (CN, DNS SANs), plus for a relay (`--allow-client`)
  exactly the nodes the spec lists for it (`transport.relays`);
* Kubernetes: the node whose status carries the condition (the agent node-binding admission
  policy lets only that node's agent write it) must be the node its key names;
* the controller, last: an event in its store whose key names another node than the event.

A refusal is audited (`transport.refused`, one record per refused batch or condition) and is
never an action: the fault is not stored, or is decided `refused_source`, which neither the
breaker nor the escalation ladder counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

REFUSED_SOURCE = "refused_source"
REFUSED = "transport.refused"
KEYS_IN_RECORD = 20  # a refused batch's keys named in its audit record; the count says the rest


def key_node(key: str) -> str:
    """The node a fault's key names: its source."""
    return key.split(":", 1)[0]


def speaks_for(names: Iterable[str], relays: Mapping[str, Iterable[str]]) -> set[str]:
    """The nodes a client known by `names` may report for: itself, and the nodes listed for each
    relay it is."""
    names = set(names)
    return names.union(*(set(relays[n]) for n in names if n in relays))


def audit_refusal(audit, actor: str, transport: str, source: str, node: str, keys: list[str], **payload) -> None:
    """One audit record for the faults of `node` that `source` may not report."""
    audit.append(REFUSED, f"{source} may not report faults of node {node!r} ({transport})", actor=actor, node=node,
                 payload={"transport": transport, "source": source, "count": len(keys),
                          "keys": keys[:KEYS_IN_RECORD], **payload})
