"""The kernel-log parser: XID, SXid and fallen-off-the-bus messages under every prefix a
log source adds; unrelated lines ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from aidc.events import Action, FaultKind
from aidc.health.catalog import load_catalog
from aidc.health.kmsg import KernelLogParser, kernel_message, normalize_pci, parse_lines

FORMATS_LOG = Path(__file__).parent / "data" / "kernel-log-formats.log"

PREFIXES = {
    "dmesg": "[ 1843.308145] ",
    "dmesg -T": "[Fri Aug 30 11:43:14 2024] ",
    "journald": "Aug 30 11:43:14 gpu-node-7 kernel: ",
    "journald with dmesg time": "Aug  3 11:43:14 gpu-node-7 kernel: [ 1843.308145] ",
    "syslog ISO-8601": "2024-08-30T11:43:14.123456+00:00 gpu-node-7 kernel: ",
    "/dev/kmsg": "4,1234,1843308145,-;",
    "dmesg -d": "[ 1843.308145 <    0.000123>] ",
    "dmesg -d -T": "[Fri Aug 30 11:43:14 2024 <   12.000123>] ",
    "dmesg -d -t": "[<    0.000123>] ",
    "dmesg -e, a new minute": "[Aug30 11:43] ",
    "dmesg -e, within the minute": "[  +0.000123] ",
    "RFC 5424": "<4>1 2024-08-30T11:43:14.123456+00:00 gpu-node-7 kernel - - - ",
    "RFC 5424 with structured data": '<3>1 2024-08-30T11:43:14Z gpu-node-7 kernel 0 - [origin ip="10.0.3.7"] ',
    "none": "",
}

# Real-format XID lines and the action the shipped catalog gives each.
XID_LINES = {
    13: ("NVRM: Xid (PCI:0000:17:00): 13, pid=2317, name=python, Ch 00000008, Graphics Exception: "
         "ESR 0x50df30=0x1000e", Action.RESTART_APP),
    43: ("NVRM: Xid (PCI:0000:17:00): 43, pid=2317, name=python, Ch 00000008", Action.IGNORE),
    48: ("NVRM: Xid (PCI:0000:17:00): 48, An uncorrectable double bit error (DBE) has been detected on GPU "
         "in the framebuffer at partition 3, subpartition 0.", Action.RESET_GPU),
    79: ("NVRM: Xid (PCI:0000:17:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
         Action.REBOOT_NODE),
    94: ("NVRM: Xid (PCI:0000:17:00): 94, pid=2317, name=python, Ch 00000008, Contained: SM (0x1). "
         "RST: No, D-RST: No", Action.RESTART_APP),
    109: ("NVRM: Xid (PCI:0000:17:00): 109, pid=2317, name=python, Ch 00000008, errorString CTX SWITCH TIMEOUT, "
          "Info 0x3c00c", Action.RESET_GPU),
    154: ("NVRM: Xid (PCI:0000:17:00): 154, GPU recovery action changed from 0x0 (None) to 0x2 "
          "(Node Reboot Required)", Action.REBOOT_NODE),
}

FALLEN_OFF = [
    "NVRM: The NVIDIA GPU 0000:3b:00.0",
    "NVRM: (PCI ID: 10de:2330) installed in this system has",
    "NVRM: fallen off the bus and is not responding to commands.",
]


@pytest.mark.parametrize("source", PREFIXES)
@pytest.mark.parametrize("xid", XID_LINES)
def test_xid_line_is_parsed_under_every_prefix_and_classified_per_catalog(source, xid):
    text, action = XID_LINES[xid]
    line = PREFIXES[source] + text
    (fault,) = parse_lines([line])
    assert (fault.kind, fault.xid, fault.pci, fault.line) == (FaultKind.XID, xid, "0000:17:00.0", line)
    assert fault.message == text
    assert load_catalog().classify_kernel(fault.kind, fault.xid, fault.message).action == action


@pytest.mark.parametrize("source", PREFIXES)
def test_fallen_off_bus_message_without_xid_is_one_event_with_xid_null(source):
    lines = ["[ 1.0] unrelated: eth0 link up"] + [PREFIXES[source] + l for l in FALLEN_OFF]
    (fault,) = parse_lines(lines)
    assert (fault.kind, fault.xid, fault.pci) == (FaultKind.FALLEN_OFF_BUS, None, "0000:3b:00.0")
    assert all(l in fault.line for l in FALLEN_OFF)
    assert load_catalog().classify_kernel(fault.kind, None).action == Action.REBOOT_NODE


def test_fallen_off_bus_split_across_reads_survives_a_parser_restart():
    first = KernelLogParser()
    assert first.feed(FALLEN_OFF[0]) == [] and first.feed(FALLEN_OFF[1]) == []
    resumed = KernelLogParser(first.state())  # the agent persists this state with the log position
    (fault,) = resumed.feed(FALLEN_OFF[2])
    assert fault.pci == "0000:3b:00.0"


def test_fallen_off_bus_last_line_alone_still_reports_with_unknown_pci():
    (fault,) = parse_lines([FALLEN_OFF[2]])
    assert (fault.kind, fault.pci) == (FaultKind.FALLEN_OFF_BUS, None)


def test_nvswitch_sxid_lines_carry_their_severity():
    fatal, nonfatal = parse_lines([
        "[  12.0] nvidia-nvswitch2: SXid (PCI:0000:c3:00.0): 20034, Fatal, Link 43 LTSSM Fault Up",
        "nvidia-nvswitch0: SXid (PCI:0000:c1:00.0): 12028, Non-fatal, Link 32 egress non-posted PRIV error",
    ])
    assert (fatal.kind, fatal.xid, fatal.severity) == (FaultKind.NVSWITCH_SXID, 20034, "Fatal")
    assert nonfatal.severity == "Non-fatal"
    cat = load_catalog()
    assert cat.classify_kernel(fatal.kind, fatal.xid, severity=fatal.severity).action == Action.REBOOT_NODE
    assert cat.classify_kernel(nonfatal.kind, nonfatal.xid, severity=nonfatal.severity).action == Action.IGNORE


@pytest.mark.parametrize("severity, action", [("Non-fatal", Action.IGNORE), ("Fatal", Action.REBOOT_NODE)])
def test_an_nvswitch_error_printed_as_three_lines_is_one_fault_classified_by_its_first_line(severity, action):
    # The driver prints one SXid as a report line, then its severity/engine line and its data
    # line, all three under the same "SXid (PCI:..): <code>," prefix.
    lines = [
        f"[ 812.1] nvidia-nvswitch2: SXid (PCI:0000:07:00.0): 12028, {severity}, Link 03 egress non-posted PRIV error",
        "[ 812.1] nvidia-nvswitch2: SXid (PCI:0000:07:00.0): 12028, Severity 0 Engine instance 03 Sub-engine instance 00",
        "[ 812.1] nvidia-nvswitch2: SXid (PCI:0000:07:00.0): 12028, Data {0x00000000, 0x00000000, 0x00000000, "
        "0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000}",
    ]
    (fault,) = parse_lines(lines)
    assert (fault.kind, fault.xid, fault.severity, fault.line) == (FaultKind.NVSWITCH_SXID, 12028, severity, lines[0])
    assert load_catalog().classify_kernel(fault.kind, fault.xid, fault.message, fault.severity).action == action


def test_unrelated_lines_and_look_alikes_are_ignored():
    assert parse_lines([
        "[    0.000000] Linux version 6.1.0-18-amd64",
        "Aug 30 11:43:14 host kernel: NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15",
        "Aug 30 11:43:14 host systemd[1]: Started nvidia-persistenced.",
        "NVRM: GPU at PCI:0000:17:00: GPU-1234",
        "user wrote: Xid 79 happened yesterday",
        "",
    ]) == []


def test_prefix_stripping_and_pci_spellings():
    assert kernel_message("Aug 30 11:43:14 h kernel: [ 5.1] NVRM: x\n") == "NVRM: x"
    assert normalize_pci("00000000:17:00.0") == normalize_pci("0000:17:00") == "0000:17:00.0"
    assert normalize_pci("0000:AB:01.1") == "0000:ab:01.1"
    assert normalize_pci(None) is None


def _format_blocks() -> dict[str, list[str]]:
    """kernel-log-formats.log: "## <format>" starts a block; other "#" lines are its notes."""
    blocks: dict[str, list[str]] = {}
    for line in FORMATS_LOG.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            blocks[line[3:]] = []
        elif line and not line.startswith("#"):
            blocks[list(blocks)[-1]].append(line)
    return blocks


FORMAT_BLOCKS = _format_blocks()


def _event(fault):
    return fault.kind, fault.xid, fault.pci, fault.severity, fault.message


@pytest.mark.parametrize("source", sorted(set(FORMAT_BLOCKS) - {"plain"}))
def test_every_recorded_format_gives_the_events_of_the_plain_driver_text(source):
    plain = [_event(f) for f in parse_lines(FORMAT_BLOCKS["plain"])]
    assert [(k, x, p) for k, x, p, _, _ in plain] == [(FaultKind.XID, 79, "0000:3b:00.0"), (FaultKind.XID, 48, "0000:5e:00.0")]
    faults = parse_lines(FORMAT_BLOCKS[source])
    assert [_event(f) for f in faults] == plain
    assert [f.line for f in faults] == FORMAT_BLOCKS[source]


@pytest.mark.parametrize("line", [
    # An RFC 5424 line from a program, not the kernel: another APP-NAME, a user facility
    # (`logger --rfc5424 -t kernel` logs as user.notice, <13>), or an unreadable header.
    "<4>1 2026-12-07T05:49:56Z gpu-node-7 alice - - - NVRM: Xid (PCI:0000:3b:00): 79, x",
    "<13>1 2026-12-07T05:49:56Z gpu-node-7 kernel - - - NVRM: Xid (PCI:0000:3b:00): 79, x",
    "<12>1 2026-12-07T05:49:56Z gpu-node-7 kernel 4211 - - NVRM: Xid (PCI:0000:3b:00): 79, x",
    "<4>1 2026-12-07T05:49:56Z gpu-node-7 kernel - - [unclosed NVRM: Xid (PCI:0000:3b:00): 79, x",
    "<4>1 2026-12-07T05:49:56Z gpu-node-7 kernel - - -NVRM: Xid (PCI:0000:3b:00): 79, x",
    # dmesg time stamps around a message that is not the driver's.
    "[  +0.000233] usb 1-1: Product: NVRM: Xid (PCI:0000:3b:00): 79, x",
    "[ 6113.942177 <    0.000233>] alice: NVRM: Xid (PCI:0000:3b:00): 79, x",
])
def test_a_new_format_line_from_anywhere_but_the_kernel_is_not_a_fault(line):
    assert parse_lines([line]) == []
