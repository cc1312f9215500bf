"""Slurm's node bookkeeping, in process, for interleaving tests the real daemons cannot pin down.

It answers the calls SlurmScheduler makes (`scontrol show node -o`, `scontrol update`, `squeue`,
`scontrol show job`) with slurmctld's semantics as its update_node() has them: an update that
carries a Reason replaces the node's reason, its time and its user unconditionally (there is no
compare-and-set), DRAIN adds the flag, RESUME clears it and the reason. The user Slurm records is
the caller's (munge says who called): `caller` for the scheduler's calls, the `user` given to
`drain` for an operator's. `after_call` runs a test's action (an operator's drain) right after
a given call returns, so a race lands exactly where the test says. Lines are printed in
scontrol's one-line order, with the reason stamp `[user@time]` and a `Comment=` after it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field


@dataclass
class FakeNode:
    base: str = "IDLE"
    flags: set = field(default_factory=set)
    reason: str = ""
    reason_by: str = ""
    comment: str = "(null)"


class FakeSlurm:
    def __init__(self, nodes: list[str], caller: str = "aidc"):
        self.nodes = {n: FakeNode() for n in nodes}
        self.caller = caller
        self.calls: list[list[str]] = []
        self._after: list[tuple[object, object]] = []   # (predicate on argv, action)

    # -- what operators and tests do ---------------------------------------------------
    def drain(self, node: str, reason: str, user: str) -> None:
        n = self.nodes[node]
        n.flags.add("DRAIN")
        n.reason, n.reason_by = reason, user

    def after_call(self, matches, action) -> None:
        """Run `action()` once, right after the first call whose argv `matches(argv)`."""
        self._after.append((matches, action))

    def line(self, name: str) -> str:
        n = self.nodes[name]
        state = "+".join([n.base, *sorted(n.flags)])
        reason = f" Reason={n.reason} [{n.reason_by}@2026-12-07T06:00:00]" if n.reason else ""
        return (f"NodeName={name} Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=2 Gres=gpu:2 "
                f"OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC RealMemory=1024 State={state} ThreadsPerCore=1 "
                f"Partitions=gpu CfgTRES=cpu=2 AllocTRES= CapWatts=n/a{reason} Comment={n.comment}")

    # -- the client tools ------------------------------------------------------------------
    def exec(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        out = self._answer(argv)
        for i, (matches, action) in enumerate(self._after):
            if matches(argv):
                del self._after[i]
                action()
                break
        return out

    def _answer(self, argv: list[str]) -> subprocess.CompletedProcess:
        ok = lambda text="": subprocess.CompletedProcess(argv, 0, text, "")  # noqa: E731
        if argv[:3] == ["scontrol", "show", "node"]:
            names = [a for a in argv[3:] if a != "-o"] or sorted(self.nodes)
            return ok("".join(self.line(n) + "\n" for n in names))
        if argv[:2] == ["scontrol", "update"]:
            args = dict(a.split("=", 1) for a in argv[2:])
            n = self.nodes[args["NodeName"]]
            if "Reason" in args:
                n.reason, n.reason_by = args["Reason"], self.caller
            if args.get("State") == "DRAIN":
                n.flags.add("DRAIN")
            elif args.get("State") == "RESUME":
                n.flags.discard("DRAIN")
                n.reason, n.reason_by = "", ""
            return ok()
        if argv[0] == "squeue" or argv[:3] == ["scontrol", "show", "job"]:
            return ok()
        raise AssertionError(f"FakeSlurm does not answer {argv}")
