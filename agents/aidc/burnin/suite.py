"""The burn-in's tests by name: what a runbook's `burnin` step lists in `tests:`.

`aidc burnin run` runs every test; a runbook's recertification runs the ones its step names
(a GPU reset is recertified by `gemm` and `memcpy`, a link repair by `allreduce`), through the
same launcher and node program. What a test does not cover is neither run nor judged: the node's
certificate names the tests it passed, and the judge notes each part it skipped.

Whatever the selection, every node still opens its GPUs and reads each one's telemetry (a GPU
that fell off the bus cannot be certified by any test), and the soak runs only when asked for.
No torch here: the runbook catalog validates names with this module when it loads.
"""

from __future__ import annotations

from typing import Iterable

from aidc.burnin.collectives import COLLECTIVES  # torch-free at import
from aidc.errors import BurninError

# Name -> what it runs on every node. The runbook schema (runbooks/schema.json) lists the same
# names, so an editor can complete them; tests/burnin/test_suite.py keeps the two equal.
TESTS = {
    "gemm": "fp32 and bf16 GEMM throughput per GPU, checked for correct results, and the known-answer"
            " checks for silent data corruption (seeded GEMMs and a seeded training step)",
    "memcpy": "device memory copy bandwidth per GPU",
    "storage": "write, read and metadata rates of the checkpoint volume",
    "dcgm": "`dcgmi diag` at the spec's level, where dcgmi is installed",
    "allreduce": "the all_reduce size sweep across the run's nodes (and pair tests per rail when it is slow)",
    "collectives": "the size sweeps of all five collectives (all_reduce, all_gather, reduce_scatter,"
                   " broadcast, all_to_all)",
    "train": "DDP, FSDP and pipeline training runs: the loss must fall and the parameters agree",
}
ALL = tuple(TESTS)


def select(tests: Iterable[str] | None) -> tuple[str, ...]:
    """The tests to run, in the suite's order: all of them for None or an empty list. Raises
    BurninError naming an unknown test and the known ones."""
    if tests is None:
        return ALL
    asked = list(tests)
    unknown = [t for t in asked if t not in TESTS]
    if unknown:
        raise BurninError(f"unknown burn-in test(s) {', '.join(map(repr, unknown))} (the burn-in tests are:"
                          f" {', '.join(ALL)})")
    return tuple(t for t in ALL if t in asked) or ALL


def collectives_of(tests: Iterable[str]) -> tuple[str, ...]:
    """The collective sweeps the tests ask for (aidc.burnin.collectives.COLLECTIVES names)."""
    tests = set(tests)
    if "collectives" in tests:
        return COLLECTIVES
    return ("all_reduce",) if "allreduce" in tests else ()


def describe(tests: Iterable[str]) -> str:
    """One line for a certificate's or report's reader: which tests ran."""
    tests = tuple(tests)
    return "all burn-in tests" if tests == ALL else "burn-in tests " + ", ".join(tests)
