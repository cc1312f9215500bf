"""The Slurm scheduler backend: quarantine is a drain, release a resume, state is what Slurm says.

Every Slurm call is an argv list (never a shell) run with the spec's SLURM_CONF and a timeout;
every call that changes Slurm is audited with its argv and outcome, and a failing call raises
`SlurmError` with one clear line (also audited).

Ownership of a drain is carried by Slurm itself, in a form an operator cannot match by accident:
aidc writes reasons `aidc: <reason> (event <id>, mark <m>)`, where the mark is a digest of the
node, the event and the text, and a drain is aidc's only when the mark verifies for that node
*and* Slurm recorded the user aidc runs as (`[user@time]`, from munge: not something a reason
can claim). A restarted controller, or one on another host, recognises its own drains; a node an
operator or Slurm drained or downed, whatever its reason says, is never resumed by aidc and not
counted as aidc's. After its own drain aidc reads the node again: a drain that landed on top of
aidc's is the operator's, audited as `slurm.drain_contested`. Slurm's update has no
compare-and-set, so an operator's drain landing in the milliseconds between aidc's read and its
update is overwritten by aidc's reason (the reason Slurm keeps is the last one written); aidc
cannot see that case and says so in docs/architecture.md.

Quarantine stops the node's part of the running jobs so training can move on (a drain alone
only stops *new* work): a job step that runs only on the node is cancelled (the job and its
steps on other nodes keep running: the one-`srun`-per-node layout of elastic training); a
step spanning several nodes cannot be cut in part, so its job is requeued when it allows that,
otherwise the step is cancelled; a job whose batch script runs on the node is requeued when it
allows that, otherwise left running and reported.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from aidc.errors import AidcError

AIDC_PREFIX = "aidc:"
# The maintenance reservation a drained node is recertified in (one per node, so a name found in
# Slurm says which node it holds).
RECERT_RESERVATION = "aidc-recert-{node}"
# Slurm node names as aidc accepts them: a plain host name. Hostlist syntax (`gpu-[0-3]`,
# commas) is refused so one call can never drain a range by accident.
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# The whole drain reason Slurm stores; longer reasons are cut, with a note, to keep `sinfo -R`
# readable and the argv bounded.
MAX_REASON = 200
EVENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,40}$")
_OWN_REASON = re.compile(r"^aidc: (?P<text>.*?) \((?:event (?P<event>[A-Za-z0-9_.:-]+), )?"
                         r"mark (?P<mark>[0-9a-f]{12})\)$")
# The reason's stamp as scontrol prints it. Fields before `Reason=` are Slurm's own; the reason,
# free text, runs to the last stamp, after which only the node's Comment/Extra may follow.
_REASON_TAIL = re.compile(r"^(?P<reason>.*) \[(?P<by>[^\]\[@\s]*)@[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}\]"
                          r"(?: (?:Comment|Extra)=.*)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Base node states (scontrol upper case, sinfo long/short lower case) and the suffix
# characters sinfo/scontrol append for flags.
_SUFFIX_FLAGS = {"*": "NOT_RESPONDING", "~": "POWERED_DOWN", "#": "POWERING_UP", "%": "POWERING_DOWN",
                 "!": "POWER_DOWN", "$": "MAINTENANCE", "@": "REBOOT_REQUESTED", "^": "REBOOT_ISSUED",
                 "-": "PLANNED"}
# sinfo's long/short names that fold a flag into the state name.
_SINFO_ALIASES = {
    "drained": ("IDLE", {"DRAIN"}), "drain": ("IDLE", {"DRAIN"}),
    "draining": ("ALLOCATED", {"DRAIN"}), "drng": ("ALLOCATED", {"DRAIN"}),
    "alloc": ("ALLOCATED", set()), "allocated": ("ALLOCATED", set()),
    "mix": ("MIXED", set()), "mixed": ("MIXED", set()),
    "comp": ("COMPLETING", set()), "completing": ("IDLE", {"COMPLETING"}),
    "fail": ("DOWN", {"FAIL"}), "failing": ("ALLOCATED", {"FAIL"}),
    "maint": ("IDLE", {"MAINTENANCE"}), "resv": ("IDLE", {"RESERVED"}), "reserved": ("IDLE", {"RESERVED"}),
    "inval": ("DOWN", {"INVALID_REG"}), "npc": ("IDLE", {"PERFCTRS"}),
}
_BASE_STATES = {"IDLE", "ALLOCATED", "MIXED", "DOWN", "UNKNOWN", "FUTURE", "ERROR", "COMPLETING", "END"}


class SlurmError(AidcError):
    """A Slurm client call failed, timed out, or was refused before it ran."""

    exit_code = 1


class ReleaseRefused(AidcError):
    """aidc will not resume this node: it did not drain it (see `decision`)."""

    exit_code = 3

    def __init__(self, decision: "ReleaseDecision"):
        self.decision = decision
        super().__init__(decision.detail)


@dataclass(frozen=True)
class NodeStatus:
    """One node as Slurm reports it."""
    name: str
    base: str                       # IDLE, ALLOCATED, MIXED, DOWN, UNKNOWN, FUTURE, ...
    flags: frozenset = frozenset()  # DRAIN, NOT_RESPONDING, FAIL, COMPLETING, ...
    reason: str = ""
    reason_by: str = ""             # who set the reason (scontrol's [user@time])
    raw_state: str = ""
    aidc_user: str = ""             # the user aidc runs as: only its drains are aidc's

    @property
    def drained(self) -> bool:
        """Drain requested (DRAINING or DRAINED): no new work goes there."""
        return "DRAIN" in self.flags

    @property
    def down(self) -> bool:
        return self.base == "DOWN" or "FAIL" in self.flags

    @property
    def drained_by_aidc(self) -> bool:
        """Slurm recorded aidc's user for a reason whose mark verifies for this node."""
        return (self.drained and bool(self.aidc_user) and self.reason_by == self.aidc_user
                and _verified_event(self.name, self.reason) is not None)

    @property
    def aidc_event(self) -> str | None:
        event = _verified_event(self.name, self.reason) if self.drained_by_aidc else None
        return event or None

    @property
    def out_of_service(self) -> bool:
        return self.drained or self.down

    @property
    def why_out(self) -> str | None:
        """`aidc`, `operator_drain`, `down`, or None (in service)."""
        if self.down:
            return "down"
        if self.drained:
            return "aidc" if self.drained_by_aidc else "operator_drain"
        return None

    def to_dict(self) -> dict:
        return {"node": self.name, "state": self.raw_state, "base": self.base, "flags": sorted(self.flags),
                "reason": self.reason, "reason_by": self.reason_by, "why_out": self.why_out}


@dataclass(frozen=True)
class ReleaseDecision:
    node: str
    decision: str          # released | not_drained | operator_drain | down
    detail: str
    state: str = ""
    reason: str = ""

    def to_dict(self) -> dict:
        return {"node": self.node, "decision": self.decision, "detail": self.detail, "state": self.state,
                "reason": self.reason}


@dataclass(frozen=True)
class JobAction:
    """What quarantine did to one job step on the drained node."""
    target: str            # job id or job.step
    action: str            # cancelled_step | requeued_job | left_running
    why: str
    ok: bool = True
    error: str = ""


@dataclass
class Recertification:
    """A drained node opened to aidc's burn-in in its own reservation (SlurmScheduler.recertification)."""
    node: str
    reservation: str
    was: str                      # aidc's drain reason when the window opened
    event: str | None             # its event, kept by a failure's reason
    reasons: list[str] | None = None

    def failed(self, reasons: list[str]) -> None:
        """The node did not certify: it is drained again with these reasons."""
        self.reasons = [*(self.reasons or []), *reasons] or ["no reason given"]


# --- parsing ----------------------------------------------------------------------------


def parse_state(text: str) -> tuple[str, frozenset]:
    """`IDLE+DRAIN`, `MIXED+DRAIN`, `DOWN*`, `IDLE+NOT_RESPONDING`, `drained`, `idle*`, `draining`
    ... -> (base state, flags). Unknown words become flags, so nothing is silently dropped."""
    text = text.strip()
    if not text:
        raise SlurmError("empty node state from Slurm")
    flags: set[str] = set()
    parts = text.split("+")
    head, rest = parts[0], parts[1:]
    while head and head[-1] in _SUFFIX_FLAGS:
        flags.add(_SUFFIX_FLAGS[head[-1]])
        head = head[:-1]
    lower = head.lower()
    if lower in _SINFO_ALIASES:
        base, extra = _SINFO_ALIASES[lower]
        flags |= extra
    else:
        base = head.upper()
        if base == "ALLOC":
            base = "ALLOCATED"
        if base == "DRAIN":  # scontrol shows a drained node with no base as plain DRAIN in old versions
            base, flags = "IDLE", flags | {"DRAIN"}
        if base not in _BASE_STATES:
            flags.add(base)
            base = "UNKNOWN"
    for word in rest:
        while word and word[-1] in _SUFFIX_FLAGS:
            flags.add(_SUFFIX_FLAGS[word[-1]])
            word = word[:-1]
        if word:
            flags.add(word.upper())
    return base, frozenset(flags)


_FIELD_START = re.compile(r"\s+(?=[A-Z][A-Za-z_]*=)")
_REASON_START = re.compile(r"(?:^|\s)Reason=")


def parse_node_line(line: str, aidc_user: str = "") -> NodeStatus:
    """One line of `scontrol show node -o`. Values may hold spaces (OS=, Reason=). Fields are read
    only before `Reason=`: the reason is free text (an operator's may hold `State=IDLE` or a
    bracketed stamp) and must never stand in for Slurm's own fields. It runs to its last
    `[user@time]` stamp; only Comment/Extra may follow it."""
    start = _REASON_START.search(line)
    head, tail = (line[:start.start()], line[start.end():]) if start else (line, "")
    reason, by = "", ""
    if tail:
        m = _REASON_TAIL.match(tail.rstrip())
        reason, by = (m.group("reason"), m.group("by")) if m else (tail, "")
        reason = reason.strip()
    fields = {}
    for part in _FIELD_START.split(head.strip()):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value.strip()
    if "NodeName" not in fields or "State" not in fields:
        raise SlurmError(f"cannot read Slurm's node line (no NodeName/State): {line[:120]!r}")
    base, flags = parse_state(fields["State"])
    return NodeStatus(fields["NodeName"], base, flags, "" if reason == "(null)" else reason, by, fields["State"],
                      aidc_user)


# --- input checks -------------------------------------------------------------------------


def check_node_name(node: str) -> str:
    if not isinstance(node, str) or not NODE_NAME.match(node):
        shown = repr(node)[:80]
        raise SlurmError(f"refusing node name {shown}: a Slurm node name is 1-63 letters, digits, '-', '_' or '.' "
                         "(no spaces, shell characters, hostlist ranges or newlines)")
    return node


def aidc_mark(node: str, event: str | None, text: str) -> str:
    """What binds a reason to the node and event aidc wrote it for: a copy on another node, or
    words that merely start like aidc's, do not verify. Not a secret: it stops accidents, and
    the user Slurm records stops the rest."""
    return hashlib.sha256(f"{node}\0{event or ''}\0{text}".encode()).hexdigest()[:12]


def _verified_event(node: str, reason: str) -> str | None:
    """The event of aidc's reason on `node` ('' when it named none), or None: not aidc's form,
    or a mark that does not verify."""
    m = _OWN_REASON.match(reason)
    if m is None or m.group("mark") != aidc_mark(node, m.group("event"), m.group("text")):
        return None
    return m.group("event") or ""


def drain_reason(reason: str, event: str | None, node: str) -> tuple[str, str | None]:
    """The reason aidc writes into Slurm for `node`, and a note when it had to change what it was given.

    Control characters (newlines included) become spaces; the result is cut to MAX_REASON
    characters with the event and mark suffix kept, so ownership is never lost to truncation.
    """
    check_node_name(node)
    if event is not None and not EVENT_ID.match(str(event)):
        raise SlurmError(f"refusing event id {str(event)[:60]!r}: letters, digits, '-', '_', '.', ':' only")
    notes = []
    text = str(reason)
    if _CONTROL.search(text):
        text = _CONTROL.sub(" ", text)
        notes.append("control characters (newlines) in the reason were replaced by spaces")
    text = " ".join(text.split()) or "no reason given"
    room = MAX_REASON - len(AIDC_PREFIX) - 1 - len(_suffix(event, "0" * 12))
    if len(text) > room:
        notes.append(f"reason of {len(text)} characters cut to {room}")
        text = text[:room - 3] + "..."
    return f"{AIDC_PREFIX} {text}{_suffix(event, aidc_mark(node, event, text))}", ("; ".join(notes) or None)


def _suffix(event: str | None, mark: str) -> str:
    return f" (event {event}, mark {mark})" if event is not None else f" (mark {mark})"


# --- the backend ----------------------------------------------------------------------------


@dataclass
class SlurmScheduler:
    """`SchedulerBackend` for an existing Slurm cluster, through its client tools."""

    conf: str | None = None
    bin_dir: str | None = None
    command_timeout_s: float = 10.0
    audit: object | None = None           # aidc.audit.AuditLog: every change to Slurm is recorded
    actor: str = "aidc-slurm"
    nodes: list[str] | None = None        # the spec's nodes: out_of_service() reports only these
    count_down_nodes: bool = True
    # The user Slurm records for aidc's drains: the one its client calls run as (munge says so).
    user: str = field(default_factory=lambda: pwd.getpwuid(os.geteuid()).pw_name)
    name: str = field(default="slurm", init=False)

    @classmethod
    def from_spec(cls, spec, audit=None, actor: str = "aidc-slurm") -> "SlurmScheduler":
        s = spec.slurm
        return cls(conf=s.conf, bin_dir=s.bin_dir, command_timeout_s=s.command_timeout_s, audit=audit,
                   actor=actor, nodes=[n.name for n in spec.nodes()],
                   count_down_nodes=spec.policy.count_down_nodes)

    # -- the protocol ----------------------------------------------------------------
    def quarantine(self, node: str, reason: str, event: str | None = None) -> str | None:
        """Drain the node (unless it is out already) and stop its part of running jobs.

        Returns notes on what was left as it was (an operator's drain, a down node, a job that
        could not be stopped, a reason that was cut); raises SlurmError when the drain fails.
        """
        full_reason, note = drain_reason(reason, event, node)
        before = self.node(node)
        notes = [note] if note else []
        if before.drained_by_aidc:
            notes.append(f"already drained by aidc ({before.reason!r}): no second drain")
        elif before.drained:
            # Never overwrite an operator's (or Slurm's) reason: it is how humans track the node.
            notes.append(f"already drained by someone else ({before.reason!r}, by {before.reason_by or '?'}): "
                         "left as it is; aidc will not resume it")
        elif before.down:
            notes.append(f"node is {before.raw_state} ({before.reason or 'no reason'}): out of service already; "
                         "not drained over Slurm's reason")
        else:
            self._change(["scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={full_reason}"],
                         node, "drain", {"event": event, "reason": full_reason})
            contested = self._contested(node, full_reason)
            if contested:
                notes.append(contested)
        actions = self.stop_node_work(node)
        notes += [f"{a.target}: {a.action} failed: {a.error}" if not a.ok else f"{a.target}: {a.action} ({a.why})"
                  for a in actions if not a.ok or a.action == "left_running"]
        return "; ".join(notes) or None

    def _contested(self, node: str, written: str) -> str | None:
        """Read the node again after aidc's drain: unless Slurm shows aidc's reason as aidc's, a
        drain landed on top of it and is someone else's (audited; aidc will not resume it)."""
        after = self.node(node)
        if after.drained_by_aidc and after.reason == written:
            return None
        detail = (f"after aidc's drain Slurm shows {after.raw_state} with reason {after.reason!r} set by "
                  f"{after.reason_by or '?'}: not aidc's, so aidc will not resume it")
        self._audit("slurm.drain_contested", f"drain on {node}: {detail}", node,
                    {"written": written, "state": after.raw_state, "reason": after.reason,
                     "reason_by": after.reason_by})
        return detail

    def release(self, node: str, reason: str) -> ReleaseDecision:
        """Resume the node only if aidc drained it. Raises ReleaseRefused otherwise (audited)."""
        check_node_name(node)
        st = self.node(node)
        if st.down:
            decision = ReleaseDecision(node, "down", f"{node} is {st.raw_state} ({st.reason or 'no reason'}): "
                                       "Slurm or an operator took it down; aidc never resumes it", st.raw_state, st.reason)
        elif st.drained and not st.drained_by_aidc:
            decision = ReleaseDecision(node, "operator_drain",
                                       f"{node} was drained by {st.reason_by or 'someone else'} ({st.reason!r}), "
                                       "not by aidc; aidc never resumes it", st.raw_state, st.reason)
        elif not st.drained:
            decision = ReleaseDecision(node, "not_drained", f"{node} is {st.raw_state}: in service already",
                                       st.raw_state, st.reason)
        else:
            self._change(["scontrol", "update", f"NodeName={node}", "State=RESUME"], node, "resume",
                         {"was": st.reason, "why": " ".join(_CONTROL.sub(" ", str(reason)).split())[:MAX_REASON]})
            decision = ReleaseDecision(node, "released", f"{node} resumed (was drained: {st.reason!r})",
                                       st.raw_state, st.reason)
        self._audit("slurm.release", decision.detail, node, decision.to_dict())
        if decision.decision in ("down", "operator_drain"):
            raise ReleaseRefused(decision)
        return decision

    @contextmanager
    def recertification(self, node: str) -> Iterator["Recertification"]:
        """Open a drained node to aidc's burn-in job only, and close it again whatever happens.

        Slurm schedules nothing on a DRAINED node, so the node is first held by a maintenance
        reservation that only aidc's user may use (`Flags=MAINT,IGNORE_JOBS`: created over the
        drained node), then resumed into it: other users' jobs still cannot land (Slurm 22.05:
        "Required node not available (down, drained or reserved)"). The burn-in runs with
        `--reservation`. On the way out the node is drained again (before the reservation goes,
        so there is no moment it is open to all): with aidc's reason as it was when it passed,
        or aidc's marked `recertification failed: ...` reason (same event) when
        `window.failed(reasons)` was called or the body raised; then the reservation is deleted.
        Returning the node to service stays the release step's job. Only a node aidc drained
        (mark and Slurm's user stamp verified) is opened: anything else raises ReleaseRefused.
        """
        st = self.node(node)
        if not st.drained_by_aidc:
            why = ("down" if st.down else "operator_drain" if st.drained else "not_drained")
            detail = {"down": f"{node} is {st.raw_state}: Slurm or an operator took it down",
                      "operator_drain": f"{node} was drained by {st.reason_by or 'someone else'} ({st.reason!r}),"
                                        " not by aidc: aidc does not resume it, not even for a burn-in",
                      "not_drained": f"{node} is {st.raw_state}, not drained by aidc: recertification burns in a"
                                     " node aidc took out of service"}[why]
            decision = ReleaseDecision(node, why, detail, st.raw_state, st.reason)
            self._audit("slurm.recertify_refused", detail, node, decision.to_dict())
            raise ReleaseRefused(decision)
        name = RECERT_RESERVATION.format(node=node)
        self._change(["scontrol", "create", "reservation", f"ReservationName={name}", "StartTime=now",
                      "Duration=UNLIMITED", "Flags=MAINT,IGNORE_JOBS", f"Nodes={node}", f"Users={self.user}"],
                     node, "reserve", {"reservation": name, "was": st.reason})
        window = Recertification(node, name, st.reason, st.aidc_event)
        try:
            self._change(["scontrol", "update", f"NodeName={node}", "State=RESUME"], node, "resume_into_reservation",
                         {"reservation": name, "was": st.reason})
            yield window
        except BaseException as exc:
            window.failed([f"recertification did not complete: {str(exc)[:300] or type(exc).__name__}"])
            raise
        finally:
            self._close(window)

    def close_interrupted_recertification(self, node: str) -> str | None:
        """After a restart: close the window a dead process left open (the node resumed inside
        `aidc-recert-<node>`): drain the node again with aidc's marked `recertification
        interrupted` reason (keeping the event of aidc's drain, which the reservation recorded)
        and delete the reservation. Returns the reservation closed, None when there was none."""
        check_node_name(node)
        name = RECERT_RESERVATION.format(node=node)
        shown = self._query(["scontrol", "show", "reservation", "-o", name], not_found="")
        if f"ReservationName={name} " not in shown + " ":
            return None
        st = self.node(node)
        event = None
        for rec in (self.audit.records(kind="slurm.command", node=node) if self.audit is not None else []):
            if rec.payload.get("reservation") == name and rec.payload.get("argv", [""])[1:2] == ["create"]:
                event = _verified_event(node, rec.payload.get("was", "")) or None
        window = Recertification(node, name, st.reason, event)
        window.failed(["recertification interrupted (aidc restarted while the node was open to its burn-in)"])
        if st.drained:  # drained again already (by aidc or by someone else): only the reservation goes
            self._change(["scontrol", "delete", f"ReservationName={name}"], node, "unreserve", {"reservation": name},
                         gone_ok="not found")
        else:
            self._close(window)
        return name

    def _close(self, window: "Recertification") -> None:
        node = window.node
        if window.reasons is None:
            reason = window.was  # aidc's own reason, verbatim: its mark still verifies for this node
        else:
            text = "; ".join(window.reasons)
            if not text.startswith("recertification interrupted"):
                text = "recertification failed: " + text
            reason, _ = drain_reason(text, window.event or None, node)
        try:
            self._change(["scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}"], node,
                         "drain_after_recertification", {"reservation": window.reservation, "reason": reason})
        finally:  # the reservation goes even when the drain failed: the log says which failed
            self._change(["scontrol", "delete", f"ReservationName={window.reservation}"], node, "unreserve",
                         {"reservation": window.reservation}, gone_ok="not found")

    def state(self, node: str) -> str:
        check_node_name(node)
        return "quarantined" if self.node(node).out_of_service else "in_service"

    # -- what Slurm says ----------------------------------------------------------------
    def node(self, node: str) -> NodeStatus:
        check_node_name(node)
        out = self._query(["scontrol", "show", "node", "-o", node], not_found=f"Slurm has no node {node!r}")
        for line in out.splitlines():
            if line.strip():
                st = parse_node_line(line, aidc_user=self.user)
                if st.name == node:
                    return st
        raise SlurmError(f"Slurm has no node {node!r}")

    def all_nodes(self) -> list[NodeStatus]:
        out = self._query(["scontrol", "show", "node", "-o"])
        return [parse_node_line(line, aidc_user=self.user) for line in out.splitlines()
                if line.strip() and "NodeName=" in line]

    def gpu_isolation(self, node: str) -> str | None:
        """Slurm cannot take out one named GPU: failover drains the node, and says why."""
        return ("Slurm cannot take one named GPU out of service (`scontrol update Gres=gpu:N` lowers the count "
                "without saying which device; the devices are slurmd's gres.conf)")

    def known_nodes(self) -> set[str]:
        return {st.name for st in self.all_nodes()}

    def out_of_service(self) -> dict[str, NodeStatus]:
        """The cluster-wide out-of-service set the blast radius counts: nodes aidc drained, plus
        down nodes when policy.count_down_nodes. An operator's drain is planned work and is not
        counted. Limited to the spec's nodes when given."""
        wanted = set(self.nodes) if self.nodes is not None else None
        out = {}
        for st in self.all_nodes():
            if wanted is not None and st.name not in wanted:
                continue
            if st.why_out == "aidc" or (st.why_out == "down" and self.count_down_nodes):
                out[st.name] = st
        return out

    # -- stopping the node's part of the jobs ----------------------------------------------
    def stop_node_work(self, node: str) -> list[JobAction]:
        check_node_name(node)
        steps = self._query(["squeue", "-h", "-s", "-w", node, "-o", "%i|%N"])
        actions: list[JobAction] = []
        requeued: set[str] = set()
        for line in steps.splitlines():
            step_id, _, nodelist = line.strip().partition("|")
            if not step_id or "." not in step_id:
                continue
            job, _, step = step_id.partition(".")
            if job in requeued or step == "extern":
                continue  # the extern step is Slurm's own; it ends with the job
            single = nodelist.strip() == node
            if single and step != "batch":
                actions.append(self._cancel_step(step_id, node, "the step runs only on this node"))
                continue
            info = self._job(job)
            if info.get("Requeue") == "1":
                actions.append(self._requeue(job, node, "its batch script runs on this node" if step == "batch"
                                             else f"step {step_id} spans {nodelist}"))
                requeued.add(job)
            elif step == "batch":
                actions.append(JobAction(job, "left_running", "its batch script runs on this node and the job "
                                         "is not requeueable; cancel or requeue it by hand"))
            else:
                actions.append(self._cancel_step(step_id, node, f"step spans {nodelist} and the job is not "
                                                 "requeueable: the whole step is cancelled"))
        return actions

    def _cancel_step(self, step_id: str, node: str, why: str) -> JobAction:
        try:
            self._change(["scancel", step_id], node, "cancel_step", {"step": step_id, "why": why},
                         gone_ok="Invalid job id")
        except SlurmError as exc:
            return JobAction(step_id, "cancelled_step", why, False, str(exc))
        return JobAction(step_id, "cancelled_step", why)

    def _requeue(self, job: str, node: str, why: str) -> JobAction:
        try:
            self._change(["scontrol", "requeue", job], node, "requeue_job", {"job": job, "why": why},
                         gone_ok="Invalid job id")
        except SlurmError as exc:
            return JobAction(job, "requeued_job", why, False, str(exc))
        return JobAction(job, "requeued_job", why)

    def _job(self, job: str) -> dict:
        out = self._query(["scontrol", "show", "job", "-o", job], not_found="")
        fields = {}
        for part in _FIELD_START.split(out.strip()):
            key, sep, value = part.partition("=")
            if sep:
                fields[key] = value
        return fields

    # -- running the client tools ---------------------------------------------------------
    def _argv(self, argv: list[str]) -> list[str]:
        tool = argv[0]
        path = os.path.join(self.bin_dir, tool) if self.bin_dir else shutil.which(tool)
        if not path or not os.access(path, os.X_OK):
            where = f"in {self.bin_dir}" if self.bin_dir else "on PATH"
            raise SlurmError(f"Slurm's {tool} is not installed {where} (slurm.bin_dir in the stack file)")
        return [path, *argv[1:]]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.conf:
            env["SLURM_CONF"] = self.conf
        return env

    def _exec(self, argv: list[str]) -> subprocess.CompletedProcess:
        full = self._argv(argv)
        try:
            return subprocess.run(full, env=self._env(), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=self.command_timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmError(f"`{' '.join(argv[:4])}` did not answer within {self.command_timeout_s:g} s "
                             "(is slurmctld up?)") from None
        except OSError as exc:
            raise SlurmError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

    def _query(self, argv: list[str], not_found: str | None = None) -> str:
        proc = self._exec(argv)
        if proc.returncode != 0:
            err = _first_line(proc.stderr) or _first_line(proc.stdout)
            if not_found is not None and re.search(r"not found|Invalid (node name|job id)", err, re.I):
                if not_found:
                    raise SlurmError(not_found)
                return ""
            raise SlurmError(f"`{' '.join(argv[:4])}` failed (exit {proc.returncode}): {err or 'no message'}")
        return proc.stdout

    def _change(self, argv: list[str], node: str, what: str, payload: dict, gone_ok: str | None = None) -> None:
        """Run one call that changes Slurm; audit it either way."""
        started = time.monotonic()
        try:
            proc = self._exec(argv)
        except SlurmError as exc:
            self._audit("slurm.error", f"{what} on {node}: {exc}", node, {**payload, "argv": argv, "error": str(exc)})
            raise
        err = _first_line(proc.stderr)
        took = round((time.monotonic() - started) * 1000, 1)
        if proc.returncode != 0 and not (gone_ok and gone_ok.lower() in err.lower()):
            msg = f"`{' '.join(argv[:4])}` failed (exit {proc.returncode}): {err or 'no message'}"
            self._audit("slurm.error", f"{what} on {node}: {msg}", node,
                        {**payload, "argv": argv, "rc": proc.returncode, "error": err, "duration_ms": took})
            raise SlurmError(msg)
        gone = proc.returncode != 0
        self._audit("slurm.command", f"{what} on {node}" + (" (already gone)" if gone else ""), node,
                    {**payload, "argv": argv, "rc": proc.returncode, "duration_ms": took,
                     **({"note": err} if gone else {})})

    def _audit(self, kind: str, reason: str, node: str, payload: dict) -> None:
        if self.audit is not None:
            self.audit.append(kind, reason, actor=self.actor, node=node, payload=payload)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    # scontrol often prints a generic line first and the cause after; keep both, briefly.
    return " / ".join(lines[:2])[:300]
