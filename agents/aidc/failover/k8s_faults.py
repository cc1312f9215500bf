"""Faults on Kubernetes travel through the API server, as node-problem-detector's do.

An agent reports a fault by setting the node condition `AidcGpuHealthy=False` (status
subresource: the only node write its RBAC allows) and creating an Event; the controller
watches nodes and turns each new fault condition into a `FaultEvent` in its own store, once.
The condition carries what the controller needs in a form a person can still read in
`kubectl describe node`: reason `Xid79`, and a message ending in
`[aidc action=reboot_node gpu=0 xid=79 kind=xid event=<key>]`. The key names the fault at
its source (node, agent store, local id), so a repeated publish, a relist or a controller
restart never makes a second event of one fault.

The key also names the fault's source (aidc.failover.provenance): a condition on one node whose
key names another node is refused, audited once per node and key (also across restarts), and
never stored. The agent node-binding admission policy (infra/aidc_infra/agent_binding.py) keeps
an agent from writing another node's status at all; this check holds where it is missing.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Callable

from aidc.events import Action, FaultEvent, FaultKind
from aidc.failover.kubernetes import CONDITION
from aidc.failover.provenance import audit_refusal, key_node
from aidc.store import Store

_TAG = re.compile(r"\[aidc action=(?P<action>[a-z_]+) gpu=(?P<gpu>-|\d{1,3}) xid=(?P<xid>-|\d{1,5}) "
                  r"kind=(?P<kind>[a-z_]+) event=(?P<key>[A-Za-z0-9._:/-]{1,200})\]$")
MESSAGE_TEXT_MAX = 512


def condition_reason(event: FaultEvent) -> str:
    if event.xid is not None:
        return f"Xid{event.xid}"
    return "".join(part.capitalize() for part in event.kind.value.split("_"))


def fault_condition(event: FaultEvent, key: str) -> dict:
    """The node condition an agent sets for one fault."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.observed_at))
    tag = (f"[aidc action={event.action.value} gpu={'-' if event.gpu is None else event.gpu} "
           f"xid={'-' if event.xid is None else event.xid} kind={event.kind.value} event={key}]")
    text = " ".join(event.message.split())[:MESSAGE_TEXT_MAX]
    return {"type": CONDITION, "status": "False", "reason": condition_reason(event),
            "message": f"{text} {tag}", "lastHeartbeatTime": now, "lastTransitionTime": now}


def fault_from_condition(node: str, cond: dict) -> tuple[str, FaultEvent] | None:
    """The fault an agent's condition reports, or None (healthy, or not an agent's report)."""
    if cond.get("type") != CONDITION or cond.get("status") != "False":
        return None
    message = cond.get("message") or ""
    match = _TAG.search(message)
    if not match:
        return None  # e.g. the controller's own quarantine condition: not a new fault
    try:
        action, kind = Action(match["action"]), FaultKind(match["kind"])
    except ValueError:
        return None
    gpu = None if match["gpu"] == "-" else int(match["gpu"])
    xid = None if match["xid"] == "-" else int(match["xid"])
    text = message[:match.start()].strip()
    return match["key"], FaultEvent(node=node, kind=kind, action=action, message=text, source="kubernetes",
                                    gpu=gpu, xid=xid, observed_at=time.time())


class NodeWatch:
    """List and watch nodes, resuming from the last resourceVersion; relist on 410 Gone."""

    def __init__(self, api_client, timeout_s: int = 30, label_selector: str | None = None):
        from kubernetes import client, watch

        self._client, self._watch = client, watch
        self.core = client.CoreV1Api(api_client)
        self.timeout_s = timeout_s
        self.label_selector = label_selector
        self.resource_version: str | None = None
        self.relists = 0

    def relist(self, handle: Callable[[dict], None]) -> None:
        kwargs = {"label_selector": self.label_selector} if self.label_selector else {}
        nodes = self.core.list_node(**kwargs)
        for obj in nodes.items:
            handle(self._client.ApiClient().sanitize_for_serialization(obj))
        self.resource_version = nodes.metadata.resource_version
        self.relists += 1

    def watch_once(self, handle: Callable[[dict], None], stop: threading.Event | None = None) -> None:
        """One watch call (up to timeout_s); a 410 forgets the version so the next call relists."""
        if self.resource_version is None:
            self.relist(handle)
        kwargs = {"label_selector": self.label_selector} if self.label_selector else {}
        w = self._watch.Watch()
        try:
            for ev in w.stream(self.core.list_node, resource_version=self.resource_version,
                               timeout_seconds=self.timeout_s, **kwargs):
                obj = ev["raw_object"]
                self.resource_version = obj["metadata"]["resourceVersion"]
                if ev["type"] in ("ADDED", "MODIFIED"):
                    handle(obj)
                if stop is not None and stop.is_set():
                    w.stop()
        except self._client.ApiException as exc:
            if exc.status != 410:
                raise
            self.resource_version = None  # too old: start again from a fresh list


REFUSED_KEY = "refused_source:{}"  # per node: the key of the foreign condition last audited there


class KubernetesFaultSource:
    """Turns agents' fault conditions into FaultEvents in the controller's store, each once;
    refuses (audited in `audit`, the controller's log) a condition whose key names another node."""

    def __init__(self, store: Store, watch: NodeWatch, audit=None, actor: str = "failover-node-watch"):
        self.store, self.watch, self.audit, self.actor = store, watch, audit, actor
        self.appended = self.refused = 0

    def handle(self, node: dict) -> None:
        name = node["metadata"]["name"]
        for cond in (node.get("status") or {}).get("conditions") or []:
            found = fault_from_condition(name, cond)
            if found is None:
                continue
            if key_node(found[0]) != name:
                self._refuse(name, found[0])
                continue
            # The agent's key, as the HTTPS transport delivers it: one event per key (INSERT OR IGNORE).
            if self.store.ingest(*found) is not None:
                self.appended += 1

    def _refuse(self, name: str, key: str) -> None:
        """A node carries one AidcGpuHealthy condition, so the watch shows the same foreign one on
        every update of that node and every relist: audited when its key is new for the node."""
        self.refused += 1
        if self.store.get(REFUSED_KEY.format(name)) == key:
            return
        if self.audit is not None:  # audited before the write that marks it audited
            audit_refusal(self.audit, self.actor, "kubernetes", key_node(key), name, [key], condition=CONDITION)
        self.store.put(REFUSED_KEY.format(name), key)

    def run(self, stop: threading.Event, on_error: Callable[[Exception], None] | None = None,
            backoff_s: float = 1.0) -> None:
        from aidc.retry import Backoff, RetryPolicy

        backoff = Backoff(RetryPolicy(attempts=None, base_s=backoff_s, cap_s=30.0))
        while not stop.is_set():
            try:
                self.watch.watch_once(self.handle, stop)
                backoff.succeeded()
            except Exception as exc:  # API server away: say so, wait, try again from where we were
                if on_error:
                    on_error(exc)
                stop.wait(backoff.failed())
