"""Only the kernel speaks for the driver: a driver line counts when its source format shows it
came from the kernel (the kernel facility in /dev/kmsg, `dmesg -r/-x` and journald JSON; the
`kernel:` tag in syslog/journald text; plain dmesg, which is the kernel's own buffer) and the
message starts with the driver's text in ASCII digits. Anything else that merely looks like
a driver line is ignored."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from aidc.events import FaultKind
from aidc.health.kmsg import KernelLogFollower, KernelLogParser, Position, kernel_message, parse_lines

XID79 = "NVRM: Xid (PCI:0000:17:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
SXID = "nvidia-nvswitch2: SXid (PCI:0000:c3:00.0): 20034, Fatal, Link 43 LTSSM Fault Up"


def journal_json(message, **fields) -> str:
    """One line of `journalctl -o json`, with the fields journald records for the entry."""
    entry = {"__REALTIME_TIMESTAMP": "1725018194123456", "_HOSTNAME": "gpu-node-7", "PRIORITY": "3",
             "MESSAGE": message, **fields}
    return json.dumps(entry)


# The same driver message as each kernel-log source prints it when the kernel logged it.
KERNEL_ORIGIN = {
    "dmesg": "[ 1843.308145] {}",
    "dmesg -t": "{}",
    "dmesg -T": "[Fri Aug 30 11:43:14 2024] {}",
    "dmesg --time-format iso": "2024-08-30T11:43:14,123456+00:00 {}",
    "dmesg -r": "<3>[ 1843.308145] {}",
    "dmesg -x": "kern  :err   : [ 1843.308145] {}",
    "/dev/kmsg": "3,1234,1843308145,-;{}",
    "/dev/kmsg with caller id": "3,1234,1843308145,-,caller=T412;{}",
    "syslog (rsyslog, BSD time)": "Aug 30 11:43:14 gpu-node-7 kernel: {}",
    "syslog with dmesg time": "Aug  3 11:43:14 gpu-node-7 kernel: [ 1843.308145] {}",
    "syslog RFC 3339": "2024-08-30T11:43:14.123456+00:00 gpu-node-7 kernel: {}",
    "journalctl -o short-iso": "2024-08-30T11:43:14+0000 gpu-node-7 kernel: {}",
    "journalctl -o short-precise": "Aug 30 11:43:14.123456 gpu-node-7 kernel: {}",
    "journalctl -o short-monotonic": "[ 1843.308145] gpu-node-7 kernel: {}",
    "journalctl -o short-unix": "1725018194.123456 gpu-node-7 kernel: {}",
    "journalctl -o short-full": "Fri 2024-08-30 11:43:14 UTC gpu-node-7 kernel: {}",
}

JSON_KERNEL = {
    "journalctl -o json, kernel transport": dict(_TRANSPORT="kernel", SYSLOG_FACILITY="0", SYSLOG_IDENTIFIER="kernel"),
    "journalctl -o json --output-fields without _TRANSPORT": dict(SYSLOG_FACILITY="0"),
}


@pytest.mark.parametrize("source", KERNEL_ORIGIN)
@pytest.mark.parametrize("message, kind", [(XID79, FaultKind.XID), (SXID, FaultKind.NVSWITCH_SXID)], ids=["xid", "sxid"])
def test_a_driver_line_from_the_kernel_is_detected_in_every_source_format(source, message, kind):
    line = KERNEL_ORIGIN[source].format(message)
    (fault,) = parse_lines([line])
    assert (fault.kind, fault.line, fault.message) == (kind, line, message)


@pytest.mark.parametrize("fields", JSON_KERNEL.values(), ids=list(JSON_KERNEL))
def test_a_journald_json_entry_from_the_kernel_is_detected(fields):
    line = journal_json(XID79, **fields)
    (fault,) = parse_lines([line])
    assert (fault.kind, fault.xid, fault.pci, fault.message, fault.line) == (FaultKind.XID, 79, "0000:17:00.0",
                                                                            XID79, line)


def test_a_journald_json_message_stored_as_bytes_is_read():
    # journald prints a MESSAGE that is not printable UTF-8 as an array of byte values.
    raw = list((XID79 + " \xff").encode("latin-1"))
    (fault,) = parse_lines([journal_json(raw, _TRANSPORT="kernel", SYSLOG_FACILITY="0")])
    assert fault.xid == 79


# The same driver text, logged by something other than the kernel.
NOT_FROM_THE_KERNEL = {
    "logger through syslog (tag = user name)": f"Aug 30 11:43:14 gpu-node-7 alice: {XID79}",
    "logger -t with a pid": f"Aug 30 11:43:14 gpu-node-7 myjob[4242]: {XID79}",
    "logger through journald, short-iso": f"2024-08-30T11:43:14+0000 gpu-node-7 alice[4242]: {XID79}",
    "logger through journald, short-monotonic": f"[ 1843.308145] gpu-node-7 alice[4242]: {XID79}",
    "logger through journald, short-unix": f"1725018194.123456 gpu-node-7 alice: {XID79}",
    "a service's stdout in journald": f"Aug 30 11:43:14 gpu-node-7 python3[991]: {XID79}",
    "sudo line quoting the command": (f"Aug 30 11:43:14 gpu-node-7 sudo[4321]:    alice : TTY=pts/0 ; "
                                      f"PWD=/home/alice ; USER=root ; COMMAND=/usr/bin/logger {XID79}"),
    "user facility in /dev/kmsg (root wrote to it)": f"12,1235,1843308999,-;{XID79}",
    "daemon facility in /dev/kmsg": f"30,1236,1843309000,-;{XID79}",
    "user facility in a raw <pri> prefix (/proc/kmsg)": f"<12>[ 1843.308145] {XID79}",
    "user facility in dmesg -x": f"user  :warn  : [ 1843.308145] {XID79}",
    "journald json, syslog transport with the tag 'kernel'":
        journal_json(XID79, _TRANSPORT="syslog", SYSLOG_FACILITY="0", SYSLOG_IDENTIFIER="kernel"),
    "journald json, native protocol claiming facility 0":
        journal_json(XID79, _TRANSPORT="journal", SYSLOG_FACILITY="0", SYSLOG_IDENTIFIER="kernel"),
    "journald json, stdout transport": journal_json(XID79, _TRANSPORT="stdout", SYSLOG_IDENTIFIER="python3"),
    "journald json, kernel transport but user facility (written to /dev/kmsg)":
        journal_json(XID79, _TRANSPORT="kernel", SYSLOG_FACILITY="1", SYSLOG_IDENTIFIER="alice"),
    "journald json, user facility and no _TRANSPORT": journal_json(XID79, SYSLOG_FACILITY="1"),
    # A message with an embedded newline: journalctl indents the continuation line.
    "journald continuation line": f"                                          {XID79}",
}

# Lines the kernel did print, where the driver's text appears inside something else.
KERNEL_LOOKALIKES = {
    "USB product string": f"[ 5.123456] usb 1-1: Product: {XID79}",
    "USB product string in syslog": f"Aug 30 11:43:14 gpu-node-7 kernel: usb 3-2: Product: {XID79}",
    "USB product named Xid": "[ 5.123456] usb 3-2: Product: Xid 79 Gaming Mouse",
    "USB manufacturer string with an SXid": f"[ 5.2] usb 3-2: Manufacturer: {SXID}",
    "pattern mid-line": f"[ 1.0] audit: type=1400 msg={XID79}",
    "pattern mid-line in /dev/kmsg": f"4,1,1,-;hid-generic 0003:046D:C52B.0003: input: {XID79}",
    "message not at the start after the kernel tag": f"Aug 30 11:43:14 gpu-node-7 kernel: x {XID79}",
}

UNICODE_DIGITS = {
    "full-width": "\uff17\uff19",            # ７９
    "Arabic-Indic": "\u0667\u0669",          # ٧٩
    "Devanagari": "\u096d\u096f",            # ७९
    "mathematical bold": "\U0001d7d5\U0001d7d7",  # 𝟕𝟗
    "one full-width digit": "7\uff19",
}


@pytest.mark.parametrize("line", NOT_FROM_THE_KERNEL.values(), ids=list(NOT_FROM_THE_KERNEL))
def test_driver_text_logged_by_anything_but_the_kernel_is_ignored(line):
    assert parse_lines([line]) == []


@pytest.mark.parametrize("line", KERNEL_LOOKALIKES.values(), ids=list(KERNEL_LOOKALIKES))
def test_driver_text_inside_another_kernel_message_is_ignored(line):
    assert parse_lines([line]) == []


@pytest.mark.parametrize("digits", UNICODE_DIGITS.values(), ids=list(UNICODE_DIGITS))
def test_an_xid_written_in_non_ascii_digits_is_not_an_xid(digits):
    parser = KernelLogParser()
    assert parser.feed(f"[ 1843.308145] NVRM: Xid (PCI:0000:17:00): {digits}, GPU has fallen off the bus.") == []
    assert parser.feed(f"[ 1.0] nvidia-nvswitch{digits}: SXid (PCI:0000:c3:00.0): 20034, Fatal, Link 43") == []


@pytest.mark.parametrize("digits", UNICODE_DIGITS.values(), ids=list(UNICODE_DIGITS))
def test_non_ascii_digits_in_a_prefix_do_not_make_a_kernel_line(digits):
    assert parse_lines([f"{digits},1,1,-;{XID79}", f"[ {digits}.5] gpu-node-7 alice: {XID79}"]) == []


def test_kernel_message_is_the_message_of_a_kernel_line_and_none_for_any_other_line():
    assert kernel_message(f"Aug 30 11:43:14 h kernel: [ 5.1] {XID79}\n") == XID79
    assert kernel_message(f"Aug 30 11:43:14 h alice: {XID79}") is None
    assert kernel_message(f"12,1,1,-;{XID79}") is None
    assert kernel_message(f"[ 5.1] usb 1-1: Product: {XID79}") == f"usb 1-1: Product: {XID79}"


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK | os.W_OK), reason="/dev/kmsg not writable here (needs root)")
def test_a_record_userspace_writes_into_dev_kmsg_is_not_the_kernels_even_when_it_claims_facility_0():
    # The real kernel: a write to /dev/kmsg that asks for priority <6> (kernel facility, info)
    # is stored with the user facility, which is how the parser tells it from the kernel's own.
    marker = f"aidc-test-{uuid.uuid4().hex} a userspace record"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"<6>{marker}\n")
    follower = KernelLogFollower("/dev/kmsg", Position())
    seen: list[str] = []
    try:
        for _ in range(50):  # bounded: each read returns up to 4096 records
            seen += follower.read()[0]
            if any(marker in line for line in seen):
                break
    finally:
        follower.close()
    (ours,) = [line for line in seen if marker in line]
    assert int(ours.split(",")[0]) >> 3 == 1, "the kernel gave it the user facility"
    assert kernel_message(ours) is None
    assert any(kernel_message(line) is not None for line in seen), "the kernel's own records still read"
