"""Node names from outside: checked against the scheduler's inventory where they enter, never a path.

A node name reaches aidc from a fault event (the HTTPS ingest, a store an agent wrote), an
alert's label and a person's command line. Only a name the scheduler lists as one of aidc's
nodes is acted on; any other is refused where it enters, audited (aggregated, so a flood of
them cannot grow the audit log without bound) and never becomes a quarantine intent.

A name also never builds a path by itself: `node_dir` takes only a name of the node form
(ASCII letters, digits, '_', '.', '-', starting with a letter or digit: no '/', no '..', no NUL,
no look-alike characters) and checks that the directory it names, resolved, is directly under
its base, so even a symlink planted there cannot lead out.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from aidc.errors import AidcError

# Kubernetes allows node names of up to 253 characters (a DNS subdomain), Slurm's and the
# spec's are shorter; every backend's names fit this form.
MAX_NAME = 253
NODE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")
AUDIT_KIND = "node.refused_unknown"
# One audit record for the first refusal at an entry point in a window, one summary for the
# rest of it: at most two records per entry point per window, whatever arrives.
REFUSAL_WINDOW_S = 60.0
SAMPLE = 8
# The inventory is re-read when a name is missing from it, but not more often than this,
# and in any case when it is older than INVENTORY_TTL_S (a node removed from the cluster).
INVENTORY_MIN_REFRESH_S = 1.0
INVENTORY_TTL_S = 60.0


class NodeNameError(AidcError):
    """Not a node name (form), or a name that would lead out of its directory."""


class UnknownNode(AidcError):
    """A well-formed name the scheduler does not list as one of aidc's nodes."""


def shown(name: object) -> str:
    """A name as records and messages show it: escaped (NUL, look-alikes visible), bounded."""
    text = ascii(name)
    return text if len(text) <= 80 else text[:77] + "..."


def check_node_name(name: object) -> str:
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise NodeNameError(f"refusing node name {shown(name)}: a node name is 1-{MAX_NAME} ASCII letters, "
                            "digits, '_', '.' or '-', starting with a letter or digit")
    return name


def node_dir(base: str | Path, name: str) -> Path:
    """`base/name`, for a name of the node form whose directory, resolved, is directly under base."""
    check_node_name(name)
    base = Path(base)
    root = base.resolve()
    if (root / name).resolve().parent != root:
        raise NodeNameError(f"refusing node name {shown(name)}: {base / name} leads out of {base}")
    return base / name


def spec_inventory(scheduler, spec) -> frozenset[str]:
    """The nodes aidc may act on: those its scheduler lists (`known_nodes()`), of the spec's nodes;
    on Kubernetes, whose names are the cluster's hosts, the nodes of aidc's pools. A backend that
    lists none (a test double) has the spec's nodes."""
    listed = getattr(scheduler, "known_nodes", None)
    names = frozenset(listed()) if listed is not None else None
    if getattr(scheduler, "reports_only_managed_nodes", False) and names is not None:
        return names
    declared = frozenset(n.name for n in spec.nodes())
    return declared if names is None else declared & names


class NodeInventory:
    """The scheduler's node names, cached. A name missing from the cache re-reads it (at most once
    per INVENTORY_MIN_REFRESH_S, so a flood of unknown names costs the scheduler little), so a node
    just added is known at once. When the scheduler cannot be read, a name it listed before is
    still known; an unlisted one raises what the read raised (unknown is not the same as not known)."""

    def __init__(self, read: Callable[[], Iterable[str]], clock: Callable[[], float] = time.monotonic):
        self._read, self._clock = read, clock
        self._names: frozenset[str] | None = None
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def knows(self, name: object) -> bool:
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            return False
        with self._lock:
            now = self._clock()
            fresh = now - self._read_at < INVENTORY_TTL_S
            if self._names is not None and fresh and (name in self._names
                                                      or now - self._read_at < INVENTORY_MIN_REFRESH_S):
                return name in self._names
            try:
                self._names = frozenset(self._read())
            except Exception:
                if self._names is not None and name in self._names:
                    return True
                raise
            self._read_at = now
            return name in self._names

    __contains__ = knows


class RefusalLog:
    """Audits refused node names, aggregated per entry point (`where`): the first refusal in a
    window is recorded at once; the others are counted and recorded as one summary (counts, a
    sample of names and sources) when the window is over: at the next refusal, `flush()`, or a
    `flush(expired_only=True)` from the caller's loop. `lock` is the one guarding `audit`."""

    def __init__(self, audit, actor: str, lock: threading.Lock | None = None,
                 clock: Callable[[], float] = time.monotonic, window_s: float = REFUSAL_WINDOW_S):
        self.audit, self.actor, self._clock, self.window_s = audit, actor, clock, window_s
        self._lock = lock or threading.Lock()
        self._windows: dict[str, dict] = {}

    def refuse(self, name: object, where: str, source: str, reason: str) -> None:
        with self._lock:
            now = self._clock()
            window = self._windows.get(where)
            if window is not None and now < window["until"]:
                window["refused"] += 1
                for key, value in (("names", shown(name)), ("sources", source)):
                    if value in window[key] or len(window[key]) < SAMPLE:
                        window[key][value] += 1
                return
            if window is not None:
                self._summarise(where, window)
            self._windows[where] = {"until": now + self.window_s, "refused": 0, "names": Counter(),
                                    "sources": Counter()}
            self.audit.append(AUDIT_KIND, reason, actor=self.actor,
                              payload={"where": where, "name": shown(name), "source": source, "refused": 1})

    def flush(self, expired_only: bool = False) -> None:
        with self._lock:
            now = self._clock()
            for where, window in list(self._windows.items()):
                if not expired_only or now >= window["until"]:
                    self._summarise(where, window)
                    del self._windows[where]

    def _summarise(self, where: str, window: dict) -> None:
        if not window["refused"]:
            return
        self.audit.append(AUDIT_KIND, f"{window['refused']} more unknown node name(s) refused at {where} "
                          f"within {self.window_s:g} s", actor=self.actor,
                          payload={"where": where, "refused": window["refused"], "names": dict(window["names"]),
                                   "sources": dict(window["sources"]), "summary": True})
