"""Scheduler backends: how failover takes a node out of service and gives it back.

The lab backend is here; Slurm (`aidc.failover.slurm`, `scontrol update state=drain`) and
Kubernetes (`aidc.failover.kubernetes`: cordon, taint, condition, eviction) implement the same
protocol; `aidc.failover.backends` opens one by the spec's `scheduler:` name. Every method is idempotent, because a restarted
controller may repeat a call whose result it did not get to record.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from aidc.files import SHARED_MODE, append_bytes, write_atomic
from aidc.nodenames import NODE_NAME, node_dir


@runtime_checkable
class SchedulerBackend(Protocol):
    name: str

    def quarantine(self, node: str, reason: str, event: str | None = None) -> str | None:
        """Stop new work on the node and stop its current work (drain). Idempotent.

        `event` names what asked for it (a fault event id, a runbook run), recorded with the
        drain where the backend can, so a restarted controller recognises its own drain.
        Returns what a best-effort step after the drain could not do (None when all went
        well); the node is out of service either way. Raises when the drain itself fails.
        """
        ...

    def release(self, node: str, reason: str) -> object:
        """Return the node to service. Idempotent. A backend that refuses (Slurm: a node aidc did
        not drain) raises an AidcError saying why; what it returns, if anything, is audited."""
        ...

    def state(self, node: str) -> str:
        """"in_service" or "quarantined", as the scheduler sees it."""
        ...

    def known_nodes(self) -> set[str]:
        """The names of the nodes this scheduler has (aidc.nodenames: a name it does not list is
        refused where it enters and never becomes an intent)."""
        ...


class LabScheduler:
    """The lab's scheduler: a node is a directory; quarantine stops the whole node.

    Stopping the whole node (its torchrun agent *and* its workers, each in its own
    process group) matters: killing only the agent leaves the worker training and
    writing checkpoints for seconds, and killing only a worker livelocks torchrun.
    The node's process groups are listed in `nodes/<node>/pgids.json` by whoever starts them.
    Every call is journaled in `nodes/<node>/scheduler.jsonl` before it acts, with the node's
    state as the scheduler saw it (`was`): a quarantine of a node that `was` quarantined is
    a repeated action (bench/crash_harness.py counts them).
    """

    name = "lab"

    def __init__(self, lab_dir: str | os.PathLike, on_quarantine=None, on_quarantine_gpu=None):
        self.lab_dir = Path(lab_dir)
        # Called after the node is stopped, e.g. to tell the rendezvous at once.
        self.on_quarantine = on_quarantine
        # The same for one GPU's rank (lab.ranks: gpu): on_quarantine_gpu(node, gpu).
        self.on_quarantine_gpu = on_quarantine_gpu

    def _node_dir(self, node: str) -> Path:
        # A name from an event or a command line: never a path out of nodes/ (NodeNameError).
        path = node_dir(self.lab_dir / "nodes", node)
        if not path.is_dir():
            raise KeyError(f"no lab node {node!r} under {self.lab_dir / 'nodes'}")
        return path

    def _journal(self, node: str, op: str, reason: str) -> None:
        entry = {"op": op, "reason": reason, "was": self.state(node), "at": time.time(), "pid": os.getpid()}
        append_bytes(self._node_dir(node) / "scheduler.jsonl", (json.dumps(entry) + "\n").encode(), SHARED_MODE)

    def known_nodes(self) -> set[str]:
        """A lab node is a directory under nodes/ (with a node's name)."""
        try:
            return {p.name for p in (self.lab_dir / "nodes").iterdir()
                    if p.is_dir() and not p.is_symlink() and NODE_NAME.fullmatch(p.name)}
        except FileNotFoundError:
            return set()

    def quarantine(self, node: str, reason: str, event: str | None = None) -> str | None:
        d = self._node_dir(node)
        self._journal(node, "quarantine", reason)
        write_atomic(d / "quarantined", json.dumps({"reason": reason, "event": event, "at": time.time()}), SHARED_MODE)
        # The node's workload: its one rank, or (lab.ranks: gpu) every GPU's rank.
        ranks = [int(p.name[3:]) for p in (d / "ranks").glob("gpu*") if p.name[3:].isdigit()]
        for pgid in self.process_groups(node) + [g for gpu in ranks for g in self.process_groups(node, gpu)]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.on_quarantine:
            # Best effort: the node is stopped already, and the rendezvous drops it when its
            # heartbeat expires anyway. Failing here (say the rendezvous store is gone because
            # training ended) must not leave the quarantine unrecorded.
            try:
                self.on_quarantine(node)
            except Exception as exc:
                return f"on_quarantine hook failed: {exc!r}"
        return None

    def release(self, node: str, reason: str) -> None:
        self._journal(node, "release", reason)
        (self._node_dir(node) / "quarantined").unlink(missing_ok=True)

    def state(self, node: str) -> str:
        return "quarantined" if (self._node_dir(node) / "quarantined").exists() else "in_service"

    # -- one GPU (aidc.failover.gpu_quarantine) ------------------------------------------
    # With lab.ranks: gpu every GPU trains in a rank of its own, started with its own elastic
    # agent, whose process groups are listed in nodes/<node>/ranks/gpu<N>/pgids.json: stopping
    # them takes that GPU out and leaves the node's other ranks training. With lab.ranks: node
    # the node's one rank spans all its GPUs, and no GPU can leave alone.
    def gpu_isolation(self, node: str) -> str | None:
        """Why one GPU of `node` cannot be taken out alone (None: it can). A lab made with
        lab.ranks: gpu has a rank directory per GPU (nodes/<node>/ranks/)."""
        if not (self._node_dir(node) / "ranks").is_dir():
            return f"lab node {node} trains one rank across all its GPUs (lab.ranks: node)"
        return None

    def quarantine_gpu(self, node: str, gpu: int, reason: str, event: str | None = None) -> str | None:
        rank_dir = self.rank_dir(node, gpu)
        self._journal(node, f"quarantine_gpu{gpu}", reason)
        write_atomic(self._node_dir(node) / f"quarantined-gpu{gpu}",
                     json.dumps({"reason": reason, "event": event, "at": time.time()}), SHARED_MODE)
        for pgid in self.process_groups(node, gpu):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.on_quarantine_gpu and rank_dir.is_dir():
            try:  # best effort, as for a node: the rank's heartbeat expires anyway
                self.on_quarantine_gpu(node, gpu)
            except Exception as exc:
                return f"on_quarantine_gpu hook failed: {exc!r}"
        return None

    def release_gpu(self, node: str, gpu: int, reason: str) -> None:
        self._journal(node, f"release_gpu{gpu}", reason)
        (self._node_dir(node) / f"quarantined-gpu{gpu}").unlink(missing_ok=True)

    def gpu_state(self, node: str, gpu: int) -> str:
        return "quarantined" if (self._node_dir(node) / f"quarantined-gpu{gpu}").exists() else "in_service"

    def rank_dir(self, node: str, gpu: int) -> Path:
        """Where one GPU's rank keeps its pid, warm marker and process groups (lab.ranks: gpu)."""
        return self._node_dir(node) / "ranks" / f"gpu{int(gpu)}"

    def process_groups(self, node: str, gpu: int | None = None) -> list[int]:
        path = (self._node_dir(node) if gpu is None else self.rank_dir(node, gpu)) / "pgids.json"
        try:
            return [int(p) for p in json.loads(path.read_text())]
        except (FileNotFoundError, ValueError):
            return []

    def add_process_group(self, node: str, pgid: int, gpu: int | None = None) -> None:
        path = (self._node_dir(node) if gpu is None else self.rank_dir(node, gpu)) / "pgids.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        groups = sorted(set(self.process_groups(node, gpu)) | {pgid})
        write_atomic(path, json.dumps(groups), SHARED_MODE)
