"""The versioned XID catalog (data/xid_catalog.yaml) and its classification rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aidc.errors import SpecError
from aidc.events import Action, FaultKind
from aidc.health.catalog import load_catalog


def test_shipped_catalog_loads_and_names_its_source_and_version():
    cat = load_catalog()
    assert cat.version and cat.source["name"].startswith("NVIDIA XID catalog")
    assert cat.unknown_action == Action.CONTACT_SUPPORT
    assert set(cat.faults) == {k.value for k in FaultKind} - {"xid", "nvswitch_sxid"}


@pytest.mark.parametrize("xid,action", [
    (8, "restart_app"), (13, "restart_app"), (31, "restart_app"), (38, "ignore"), (43, "ignore"),
    (48, "reset_gpu"), (62, "reset_gpu"), (63, "ignore"), (64, "reset_gpu"), (74, "contact_support"),
    (79, "reboot_node"), (92, "ignore"), (94, "restart_app"), (95, "reset_gpu"), (109, "reset_gpu"),
    (119, "reset_gpu"), (137, "ignore"), (144, "contact_support"), (151, "reboot_node"), (157, "ignore"),
])
def test_xid_actions_follow_the_catalog(xid, action):
    assert load_catalog().classify_xid(xid).action == Action(action)


def test_unknown_xid_goes_to_a_human_never_a_reboot():
    c = load_catalog().classify_xid(9999)
    assert c.action == Action.CONTACT_SUPPORT and "not in the catalog" in c.reason


@pytest.mark.parametrize("stated,action", [
    ("0x0 (None) to 0x2 (Node Reboot Required)", Action.REBOOT_NODE),
    ("0x0 (None) to 0x1 (GPU Reset Required)", Action.RESET_GPU),
    ("0x0 (None) to 0x4 (Drain and Reset)", Action.RESET_GPU),
    ("0x0 (None) to 0x3 (Drain P2P)", Action.RESTART_APP),
    ("0x2 (Node Reboot Required) to 0x0 (None)", Action.IGNORE),
    ("0x0 (None) to (Node Reboot Required)", Action.REBOOT_NODE),  # by name when no code
    ("0x0 (None) to 0x9 (Something New)", Action.CONTACT_SUPPORT),
])
def test_xid_154_follows_the_action_the_driver_states(stated, action):
    assert load_catalog().classify_xid(154, f"GPU recovery action changed from {stated}").action == action


def test_xid_154_without_a_readable_verdict_goes_to_a_human():
    assert load_catalog().classify_xid(154, "garbled").action == Action.CONTACT_SUPPORT


@pytest.mark.parametrize("kind,action", [
    (FaultKind.FALLEN_OFF_BUS, Action.REBOOT_NODE), (FaultKind.ECC_DBE, Action.RESET_GPU),
    (FaultKind.ROW_REMAP_PENDING, Action.RESET_GPU), (FaultKind.ROW_REMAP_FAILURE, Action.CONTACT_SUPPORT),
    (FaultKind.THERMAL_THROTTLE, Action.IGNORE), (FaultKind.NVLINK_DOWN, Action.CONTACT_SUPPORT),
    (FaultKind.PCIE_DEGRADED, Action.CONTACT_SUPPORT), (FaultKind.DEVICE_HANG, Action.REBOOT_NODE),
])
def test_non_xid_faults_have_catalog_actions(kind, action):
    assert load_catalog().classify_fault(kind).action == action


def test_a_catalog_file_with_a_bad_action_names_the_key(tmp_path):
    bad = tmp_path / "cat.yaml"
    bad.write_text("version: '1'\nsource: {name: x}\nunknown_action: contact_support\n"
                   "xids:\n  79: {action: reboot_the_world}\n")
    with pytest.raises(SpecError) as err:
        load_catalog(bad)
    assert err.value.key == "xids.79.action" and "reboot_the_world" in str(err.value)


def test_an_operator_catalog_changes_the_action_without_code(tmp_path):
    own = tmp_path / "cat.yaml"
    own.write_text("version: 'site-2'\nsource: {name: our ops team}\nunknown_action: contact_support\n"
                   "xids:\n  31: {action: reset_gpu, name: page fault}\n")
    cat = load_catalog(own)
    assert cat.classify_xid(31).action == Action.RESET_GPU and cat.classify_xid(31).catalog_version == "site-2"
    assert cat.classify_xid(79).action == Action.CONTACT_SUPPORT


def test_a_missing_catalog_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="readable catalog file"):
        load_catalog(tmp_path / "absent.yaml")


# XID 154's text comes from the kernel log: whatever it says, classifying it raises nothing,
# ends, and only ASCII codes the driver could print are read as a stated action.

STATED = "GPU recovery action changed from 0x0 (None) to {}"


@pytest.mark.parametrize("code", ["\uff12", "0x\uff12", "\u0662", "9" * 5000, "0x" + "f" * 5000, "2" * 30])
def test_xid_154_with_a_code_no_driver_prints_goes_to_a_human(code):
    c = load_catalog().classify_xid(154, STATED.format(code))
    assert c.action == Action.CONTACT_SUPPORT


def test_xid_154_text_full_of_spaces_is_classified_without_hanging():
    # The stated-action pattern once backtracked cubically on runs of spaces (2,000 took 25 s).
    # A thread with a generous limit turns such a hang into a failure instead of a stuck CI run.
    import threading

    results = []
    text = "GPU recovery action changed from" + " " * 50_000 + "to" + " " * 50_000 + "x"
    worker = threading.Thread(target=lambda: results.append(load_catalog().classify_xid(154, text)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert results and results[0].action == Action.CONTACT_SUPPORT


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["GPU recovery action changed from", " ", "to", "(", ")", "0x", "2", "7", "\uff12",
                                 "Node Reboot Required", "None", "f"]) | st.text(max_size=5), max_size=30).map("".join))
def test_xid_154_classification_of_any_text_raises_nothing_and_gives_a_catalog_action(text):
    c = load_catalog().classify_xid(154, text)
    assert isinstance(c.action, Action) and c.catalog_version
