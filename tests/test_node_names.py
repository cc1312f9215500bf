"""Node names from outside never build a path out of their directory, and refusals stay bounded.

Specification: `node_dir(base, name)` gives `base/name` for a node's name (the lab's gpu-0,
gpu-spare-0, n-2, a Kubernetes host name with dots) and refuses every other string - a
relative or absolute path, an empty name, NUL, a name longer than a host name, a look-alike
character - with NodeNameError, so no path built from a name leads out of its base, even
through a symlink planted there. Refusals of unknown names are audited one per entry point per
window plus one summary with the counts, however many arrive. The scheduler's inventory is
re-read for a name it did not list (a node just added), but not on every name of a flood.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aidc.audit import AuditLog
from aidc.nodenames import (AUDIT_KIND, INVENTORY_MIN_REFRESH_S, NodeInventory, NodeNameError, RefusalLog,
                            check_node_name, node_dir)

LEGITIMATE = ["gpu-0", "n-2", "gpu-spare-0", "ip-10-0-3-17.ec2.internal", "node_7",
              "worker-a1.k8s.example.com", "a" * 253]
HOSTILE = ["", ".", "..", "../x", "../../etc", "a/b", "gpu-0/..", "/etc/passwd", "/", "gpu-0\x00",
           "\x00", "-rf", ".hidden", "a" * 254, "gpu-\u0430", "gpu\u20110", "gpu-０", "gpu-0\n", " gpu-0",
           "gpu 0", "a\\b", "~root"]


def _inside(base: Path, path: Path) -> bool:
    return path.resolve().parent == base.resolve()


@pytest.mark.parametrize("name", LEGITIMATE)
def test_a_nodes_name_is_its_directory_under_the_base(tmp_path, name):
    assert node_dir(tmp_path, name) == tmp_path / name
    assert check_node_name(name) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_builds_no_path(tmp_path, name):
    with pytest.raises(NodeNameError):
        node_dir(tmp_path, name)


def test_a_symlink_planted_under_the_base_does_not_lead_out(tmp_path):
    base = tmp_path / "nodes"
    base.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", base / "gpu-9")
    with pytest.raises(NodeNameError):
        node_dir(base, "gpu-9")


def test_names_that_are_not_text_are_refused(tmp_path):
    for name in (None, 7, b"gpu-0", ["gpu-0"]):
        with pytest.raises(NodeNameError):
            node_dir(tmp_path, name)


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from(list("./\\\x00-_a0\u0430\u2011 ~")), max_size=40),
    st.lists(st.sampled_from(["..", ".", "gpu-0", "", "/", "etc"]), max_size=6).map("/".join),
))
def test_any_string_gives_a_path_directly_under_the_base_or_is_refused(tmp_path_factory, name):
    base = tmp_path_factory.getbasetemp() / "prop-nodes"
    base.mkdir(exist_ok=True)
    try:
        path = node_dir(base, name)
    except NodeNameError:
        return
    assert (path.parent, path.name) == (base, name)
    assert _inside(base, path)


# --- the refusal log -------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refusals(audit: AuditLog) -> list[dict]:
    return [r.payload for r in audit.records(kind=AUDIT_KIND)]


def test_a_flood_of_unknown_names_gives_two_records_per_window_with_every_refusal_counted(tmp_path):
    clock = Clock()
    with AuditLog(tmp_path / "audit.db") as audit:
        log = RefusalLog(audit, "test", clock=clock, window_s=60)
        for i in range(5000):
            log.refuse(f"ghost-{i}", "ingest", "relay", "not a node of this cluster")
            clock.now += 0.01  # 50 s in all: one window
        log.refuse("ghost-x", "runbook", "alertmanager", "not a node of this cluster")
        log.flush()
        got = _refusals(audit)
    ingest = [p for p in got if p["where"] == "ingest"]
    assert len(ingest) == 2
    assert ingest[0] == {"where": "ingest", "name": "'ghost-0'", "source": "relay", "refused": 1}
    assert ingest[1]["summary"] and ingest[1]["refused"] == 4999
    assert ingest[1]["sources"] == {"relay": 4999} and len(ingest[1]["names"]) <= 8
    assert [p["where"] for p in got if p["where"] == "runbook"] == ["runbook"]


def test_a_new_window_starts_with_a_record_and_closes_the_last_ones_summary(tmp_path):
    clock = Clock()
    with AuditLog(tmp_path / "audit.db") as audit:
        log = RefusalLog(audit, "test", clock=clock, window_s=60)
        for _ in range(3):
            log.refuse("ghost", "ingest", "gpu-0", "unknown")
        clock.now += 61
        log.flush(expired_only=True)
        log.refuse("../x", "ingest", "gpu-0", "unknown")
        got = _refusals(audit)
    assert [(p["refused"], p.get("summary", False)) for p in got] == [(1, False), (2, True), (1, False)]
    assert got[2]["name"] == ascii("../x")


# --- the inventory ------------------------------------------------------------------------------

def test_a_node_added_to_the_scheduler_is_known_at_once_but_a_flood_reads_it_rarely():
    clock, reads, listed = Clock(), [], {"gpu-0"}

    def read():
        reads.append(clock.now)
        return set(listed)

    inventory = NodeInventory(read, clock=clock)
    assert inventory.knows("gpu-0") and len(reads) == 1
    clock.now += INVENTORY_MIN_REFRESH_S
    listed.add("gpu-7")
    assert inventory.knows("gpu-7") and len(reads) == 2
    assert not any(inventory.knows(f"ghost-{i}") for i in range(1000))
    assert len(reads) == 2
    assert not inventory.knows("../gpu-0") and not inventory.knows("")


def test_a_scheduler_that_cannot_be_read_still_knows_what_it_listed_and_decides_nothing_else():
    clock, answers = Clock(), [{"gpu-0"}]

    def read():
        if not answers:
            raise OSError("slurmctld is down")
        return answers.pop()

    inventory = NodeInventory(read, clock=clock)
    assert inventory.knows("gpu-0")
    clock.now += 3600
    assert inventory.knows("gpu-0")
    with pytest.raises(OSError):
        inventory.knows("gpu-1")
