"""What a burn-in says while it runs, from the node programs' events (aidc.burnin.worker.emit).

Each phase counts its own events against a total known before the run: the nodes joining,
the per-node samples (every node, every round), rank 0's collective sizes, rank 0's training
steps in each mode. The localisation's pair tests run only when the fleet is slow and their
number is the run's to decide, so they are counted apart and never push the bar past its
total. Two forms: a rich bar on a terminal (`aidc burnin run`) and lines of text for a caller
that prints lines (`aidc lab run`): one when a phase starts and one every few seconds, also
while nothing has been heard yet (the node processes import torch for a while)."""

from __future__ import annotations

import time
from typing import Callable

from aidc.units import human_bytes

# Phases in the order the worker runs them, and the word each is said with.
PHASES = (("start", "starting"), ("join", "joining"), ("per_node", "per-node"), ("collectives", "collectives"),
          ("localise", "pair tests"), ("training", "training"), ("finishing", "finishing"))
LABELS = dict(PHASES)
EVENT_PHASE = {"forked": "join", "ready": "join", "sampled": "per_node", "collective": "collectives",
               "pair": "localise", "train": "training", "done": "finishing"}
COUNTED = {"ready", "sampled", "collective", "pair", "train"}


DESCRIPTIONS = {"forked": "{nodes} node process(es) started", "ready": "{node} joined",
                "sampled": "GEMM + memcpy on {node} (round {round_no})", "collective": "{op} {size}",
                "pair": "rail {rail}: ranks {a}-{b}", "train": "{mode} step {step} loss {loss:.4f}"}


def describe(event: dict) -> str:
    fields = {**event, "round_no": event.get("round", 0) + 1, "size": human_bytes(event.get("nbytes", 0))}
    return DESCRIPTIONS.get(event["event"], "{node} {event}").format(**fields)


class BurninProgress:
    """Counts per phase; `say` gets the text lines, `bar` (rich_bar()) is kept at `completed`."""

    def __init__(self, *, nodes: int, repeats: int, sizes: list[int], collectives, train_steps: int, modes: int,
                 say: Callable[[str], None] | None = None, bar=None, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.totals: dict[str, int | None] = {"join": nodes, "per_node": nodes * repeats,
                                              "collectives": len(sizes) * len(collectives), "localise": None,
                                              "training": train_steps * modes}
        self.counts = dict.fromkeys(self.totals, 0)
        self.phase, self.detail = "start", f"{nodes} node process(es) importing torch"
        self.say, self.bar, self.every_s, self.clock = say, bar, every_s, clock
        self._phase_at = self._said_at = clock()
        self._said_phase: str | None = None

    @property
    def total(self) -> int:
        return sum(t for t in self.totals.values() if t is not None)

    @property
    def completed(self) -> int:
        return sum(min(self.counts[k], t) for k, t in self.totals.items() if t is not None)

    def line(self) -> str:
        label = LABELS[self.phase]
        if self.phase in self.totals:
            total = self.totals[self.phase]
            count = f"{self.counts[self.phase]}/{total}" if total is not None else f"{self.counts[self.phase]} so far"
            return f"{label} {count}: {self.detail}"
        return f"{label}: {self.detail}"

    def observe(self, event: dict | None) -> None:
        """One event from the fleet, or None when the wait for one timed out (for the reminders)."""
        now = self.clock()
        if event is not None and event["event"] in EVENT_PHASE:
            kind, phase = event["event"], EVENT_PHASE[event["event"]]
            if phase != self.phase:
                self.phase, self._phase_at = phase, now
            if kind in COUNTED:
                self.counts[phase] += 1
            self.detail = describe(event)
        if self.bar is not None:
            from rich.markup import escape

            self.bar.update(self.bar.task_ids[0], completed=self.completed, description=escape(self.line()))
        if self.say is None:
            return
        if self._said_phase != self.phase:
            self.say(f"burn-in: {self.line()}")
            self._said_phase, self._said_at = self.phase, now
        elif now - self._said_at >= self.every_s:
            self.say(f"burn-in: {self.line()}; {now - self._phase_at:.0f} s in this phase")
            self._said_at = now

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def rich_bar(total: int):
    """A bar on stderr: stdout keeps the result (a table, or --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("burn-in"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    bar.start()
    bar.add_task("starting", total=total)
    return bar
