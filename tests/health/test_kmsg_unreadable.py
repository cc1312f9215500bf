"""A kernel line that looks like the driver's but cannot be read is counted, reported to the
caller once, and skipped; it never raises and never hides the lines after it."""

from __future__ import annotations

import pytest

from aidc.events import FaultKind
from aidc.health.kmsg import KernelLogParser, normalize_pci

XID79 = "[ 1900.000001] NVRM: Xid (PCI:0000:17:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."

UNREADABLE = {
    "SXid with an empty PCI id": "[ 1.0] nvidia-nvswitch0: SXid (PCI:::): 12028, Fatal, Link 32 egress error",
    "SXid with a PCI id of four parts": "[ 1.0] nvidia-nvswitch0: SXid (PCI:0000:c1:00.0.0): 12028, Fatal, Link 32",
    "SXid with a PCI id that is one number": "[ 1.0] nvidia-nvswitch0: SXid (PCI:1.2): 12028, Fatal, Link 32",
    "SXid with a code longer than any driver prints": "[ 1.0] nvidia-nvswitch0: SXid (PCI:0000:c1:00.0): "
                                                      + "1" * 40 + ", Fatal, Link 32",
    "XID number longer than int() converts": "[ 1.0] NVRM: Xid (PCI:0000:17:00): " + "9" * 5000 + ", pid=1",
    "XID number of 40 digits": "[ 1.0] NVRM: Xid (PCI:0000:17:00): " + "7" * 40 + ", pid=1",
    "XID without a number": "[ 1.0] NVRM: Xid (PCI:0000:17:00): , pid=1",
    "XID on a PCI device number no bus has (> 0x1f)": "[ 1.0] NVRM: Xid (PCI:0000:17:ff): 79, pid=1",
    "XID with the PCI id cut off": "Aug 30 11:43:14 gpu-node-7 kernel: NVRM: Xid (PCI:0000:1",
}


@pytest.mark.parametrize("line", UNREADABLE.values(), ids=list(UNREADABLE))
def test_an_unreadable_driver_line_is_counted_skipped_and_the_next_xid_79_is_still_detected(line):
    reported = []
    parser = KernelLogParser(on_unparsed=lambda raw, why: reported.append((raw, why)))
    assert parser.feed(line) == []
    assert parser.unparsed == 1
    ((raw, why),) = reported
    assert raw == line and why, "the caller learns which line and why"
    (fault,) = parser.feed(XID79)
    assert (fault.kind, fault.xid, fault.pci) == (FaultKind.XID, 79, "0000:17:00.0")
    assert parser.unparsed == 1


def test_driver_lookalikes_not_from_the_kernel_are_ignored_without_counting():
    parser = KernelLogParser()
    assert parser.feed("Aug 30 11:43:14 gpu-node-7 alice: NVRM: Xid (PCI:::): " + "9" * 5000) == []
    assert parser.unparsed == 0


def test_an_overlong_line_is_not_read_past_its_limit_and_counted_when_it_is_a_driver_line():
    parser = KernelLogParser()
    huge_driver = "[ 1.0] NVRM: Xid (PCI:0000:17:00): 79, " + "x" * (4 * KernelLogParser.MAX_LINE_CHARS)
    huge_other = "[ 1.0] usb 1-1: " + "y" * (4 * KernelLogParser.MAX_LINE_CHARS)
    assert parser.feed(huge_driver) == [] and parser.feed(huge_other) == []
    assert parser.unparsed == 1


def test_a_corrupt_saved_parser_state_is_dropped_not_raised():
    for state in ({"pending": "not a dict"}, {"pending": {"lines": "x"}}, ["not", "a", "mapping"], {"pending": 7}):
        parser = KernelLogParser(state)
        assert parser.feed("NVRM: fallen off the bus and is not responding to commands.")[0].pci is None


def test_the_fallen_off_bus_message_kept_between_reads_stays_small():
    # The middle line repeated forever must not grow the state saved with the log position.
    parser = KernelLogParser()
    parser.feed("NVRM: The NVIDIA GPU 0000:3b:00.0")
    for _ in range(1000):
        parser.feed("NVRM: (PCI ID: 10de:2330) installed in this system has")
    assert len(parser.state()["pending"]["lines"]) <= 3


def test_normalize_pci_leaves_what_is_not_a_pci_address_alone_instead_of_raising():
    for text in ("::", "0000:c1:00.0.0", "zz:zz:zz", "1.2", "", "\uff10\uff10:17:00"):
        assert normalize_pci(text) in (text.strip().lower(), None)
