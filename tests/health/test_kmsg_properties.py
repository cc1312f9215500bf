"""Generated kernel logs (hypothesis): whatever the input, the parser and `aidc health
parse-log` raise nothing, every fault they report is well formed, a driver line from the
kernel is always found, and the same text from anywhere else never is.

Bounded for CI: a few hundred examples per property, no per-example deadline (the machine
is shared; time is not what these tests check)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aidc.events import Action, FaultKind
from aidc.health.catalog import load_catalog
from aidc.health.kmsg import KernelLogParser, parse_lines

BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PCI_OUT = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")
KERNEL_KINDS = {FaultKind.XID, FaultKind.NVSWITCH_SXID, FaultKind.FALLEN_OFF_BUS}

# Prefixes under which a line is the kernel's, and prefixes of lines that are not.
KERNEL_PREFIXES = [
    "", "[ 1843.308145] ", "[Fri Aug 30 11:43:14 2024] ", "<4>[ 1843.308145] ", "kern  :warn  : [  12.5] ",
    "6,1234,1843308145,-;", "0,9,9,c;", "2024-08-30T11:43:14,123456+00:00 ",
    "Aug 30 11:43:14 gpu-node-7 kernel: ", "Aug  3 11:43:14 gpu-node-7 kernel: [ 1843.308145] ",
    "2024-08-30T11:43:14.123456+00:00 gpu-node-7 kernel: ", "2024-08-30T11:43:14+0000 gpu-node-7 kernel: ",
    "[ 1843.308145] gpu-node-7 kernel: ", "1725018194.123456 gpu-node-7 kernel: ",
    "[ 1843.308145 <    0.000123>] ", "[Fri Aug 30 11:43:14 2024 <   12.000123>] ", "[<    0.000123>] ",
    "[Aug30 11:43] ", "[Aug 3 11:43] ", "[  +0.000123] ", "[ +12.000123] ",
    "<4>1 2024-08-30T11:43:14.123456+00:00 gpu-node-7 kernel - - - ", "<0>1 - - kernel - - - ",
    '<3>1 2024-08-30T11:43:14Z gpu-node-7 kernel 0 - [origin ip="10.0.3.7"][m x="a \\"b\\" \\]"] \ufeff',
    "<4>1 2024-08-30T11:43:14+00:00 gpu-node-7 kernel - - - [ 1843.308145] ",
]
OTHER_PREFIXES = [
    "Aug 30 11:43:14 gpu-node-7 alice: ", "Aug 30 11:43:14 gpu-node-7 sudo[1]: alice : COMMAND=/bin/echo ",
    "[ 1843.308145] gpu-node-7 alice[7]: ", "14,1234,1843308145,-;", "<13>", "user  :notice: ",
    "[ 5.1] usb 1-1: Product: ", "  ", "x ", "2024-08-30T11:43:14+0000 gpu-node-7 logger: ",
    "<4>1 2024-08-30T11:43:14Z gpu-node-7 alice - - - ", "<13>1 2024-08-30T11:43:14Z gpu-node-7 kernel - - - ",
    "[  +0.000123] usb 1-1: Product: ", "[ 1843.308145 <    0.000123>] alice: ",
]

ascii_digits = st.text("0123456789", min_size=1, max_size=12)
unicode_digits = st.text(st.characters(categories=["Nd"]), min_size=1, max_size=6)
numbers = st.one_of(ascii_digits, unicode_digits, st.integers(0, 10**30).map(str),
                    st.sampled_from(["9" * 5000, "-1", "0x4f", "", " 79", "79 "]))
pci_texts = st.one_of(
    st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 31), st.integers(0, 7)).map(
        lambda t: "%04x:%02x:%02x.%d" % t),
    st.text("0123456789abcdefABCDEF:.", max_size=20),
    st.text(max_size=12),
)
words = st.text(max_size=40)
one_line = st.text(st.characters(exclude_characters="\n"), max_size=40)  # what a log line can hold
driver_messages = st.one_of(
    st.builds("NVRM: Xid (PCI:{}): {}, {}".format, pci_texts, numbers, words),
    st.builds("NVRM: Xid ({}): {}".format, pci_texts, numbers),
    st.builds("nvidia-nvswitch{}: SXid (PCI:{}): {}, {}, {}".format, numbers, pci_texts, numbers,
              st.sampled_from(["Fatal", "Non-fatal", "fatal", "", "Severity 0 Engine", "Data {0x0}"]), words),
    st.builds("NVRM: The NVIDIA GPU {}".format, pci_texts),
    st.just("NVRM: (PCI ID: 10de:2330) installed in this system has"),
    st.just("NVRM: fallen off the bus and is not responding to commands."),
    st.builds("NVRM: GPU at PCI:{}: GPU has fallen off the bus.".format, pci_texts),
    words,
)
journal_entries = st.builds(
    lambda message, transport, facility: json.dumps({k: v for k, v in (
        ("MESSAGE", message), ("_TRANSPORT", transport), ("SYSLOG_FACILITY", facility)) if v is not ...}),
    st.one_of(driver_messages, st.none(), st.integers(), st.lists(st.integers(-1, 300), max_size=30)),
    st.sampled_from([..., "kernel", "syslog", "journal", "stdout", None, 0]),
    st.sampled_from([..., "0", "1", 0, None, "x"]),
)
lines = st.one_of(
    st.builds(str.__add__, st.sampled_from(KERNEL_PREFIXES + OTHER_PREFIXES) | st.text(max_size=20), driver_messages),
    journal_entries,
    st.sampled_from(["[1,2]", "7", '"NVRM"', "{", '{"MESSAGE": {"a": 1}, "_TRANSPORT": "kernel"}', "\x00" * 9]),
    st.text(),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", errors="replace")),
)


def _logged_text(line: str) -> str:
    """The text a line carries: a journald JSON record's MESSAGE is JSON-escaped in the line."""
    if line.startswith("{"):
        try:
            return json.loads(line).get("MESSAGE", line)
        except ValueError:
            pass
    return line


def assert_well_formed(fault, fed: list[str]) -> None:
    assert fault.kind in KERNEL_KINDS
    if fault.kind == FaultKind.FALLEN_OFF_BUS:
        assert fault.xid is None and fault.severity is None
    else:
        assert type(fault.xid) is int and 0 <= fault.xid < 10**9
        assert fault.line in fed and fault.message in _logged_text(fault.line)
    assert fault.pci is None or PCI_OUT.fullmatch(fault.pci), fault.pci
    assert fault.severity in (None, "Fatal", "Non-fatal")
    assert isinstance(load_catalog().classify_kernel(fault.kind, fault.xid, fault.message, fault.severity).action,
                      Action)
    json.dumps(fault.to_dict(), allow_nan=False)


@BOUNDED
@given(st.lists(lines, max_size=12))
def test_any_lines_parse_without_raising_into_well_formed_faults(fed):
    unparsed = []
    parser = KernelLogParser(on_unparsed=lambda raw, why: unparsed.append(raw))
    for line in fed:
        for fault in parser.feed(line):
            assert_well_formed(fault, fed)
    assert parser.unparsed == len(unparsed) <= len(fed)
    json.dumps(parser.state())  # the state saved with the log position is always storable


XID79 = "NVRM: Xid (PCI:0000:17:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."


@BOUNDED
@given(st.lists(lines, max_size=12), st.sampled_from(KERNEL_PREFIXES))
def test_no_line_before_it_hides_a_kernel_xid_79(fed, prefix):
    faults = parse_lines(fed + [prefix + XID79])
    assert (faults[-1].kind, faults[-1].xid, faults[-1].pci) == (FaultKind.XID, 79, "0000:17:00.0")


pcis = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 31), st.integers(0, 7))


@BOUNDED
@given(st.integers(0, 999_999_999), pcis, st.booleans(), st.sampled_from(KERNEL_PREFIXES), one_line)
def test_every_driver_xid_from_the_kernel_is_found_with_its_number_and_gpu(xid, pci, with_function, prefix, rest):
    domain, bus, dev, fn = pci
    printed = f"{domain:04x}:{bus:02x}:{dev:02x}" + (f".{fn}" if with_function else "")
    (fault,) = parse_lines([f"{prefix}NVRM: Xid (PCI:{printed}): {xid}, {rest}"])
    assert (fault.xid, fault.pci) == (xid, f"{domain:04x}:{bus:02x}:{dev:02x}.{fn if with_function else 0}")


@BOUNDED
@given(st.integers(0, 999_999_999), st.sampled_from(OTHER_PREFIXES), one_line)
def test_the_same_xid_line_from_anywhere_else_is_never_found(xid, prefix, rest):
    assert parse_lines([f"{prefix}NVRM: Xid (PCI:0000:17:00): {xid}, {rest}"]) == []


@BOUNDED
@given(st.integers(0, 999_999), st.sampled_from(KERNEL_PREFIXES),
       st.text(st.characters(categories=["Nd"], exclude_characters="0123456789"), min_size=1, max_size=3),
       st.integers(0, 6))
def test_a_non_ascii_digit_anywhere_in_the_number_makes_it_not_an_xid(xid, prefix, foreign, at):
    digits = str(xid)
    at = min(at, len(digits))
    assert parse_lines([f"{prefix}NVRM: Xid (PCI:0000:17:00): {digits[:at]}{foreign}{digits[at:]}, x"]) == []


chunks = st.one_of(
    lines.map(lambda l: l.encode("utf-8", errors="surrogatepass")),
    st.binary(max_size=300),
    st.sampled_from([b"\xff\xfe\x00", b"\x00" * 50, b"\r\n", b"\n", b"9" * 5000, b"\xc3", b"\xed\xa0\x80",
                     (KERNEL_PREFIXES[1] + XID79).encode()]),
)


def run_parse_log(data: bytes, as_json: bool) -> tuple[str, str]:
    """`aidc health parse-log` on a file holding `data`, in this process: (stdout, stderr)."""
    from aidc.cli.health_cmd import parse_log

    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kern.log"
        path.write_bytes(data)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            parse_log(path, catalog=None, as_json=as_json)
    return out.getvalue(), err.getvalue()


@BOUNDED
@given(st.lists(chunks, max_size=10).map(b"\n".join), st.booleans())
def test_parse_log_handles_any_bytes_and_prints_only_well_formed_rows(data, as_json):
    stdout, _ = run_parse_log(data, as_json)
    if as_json:
        for row in map(json.loads, stdout.splitlines()):
            assert row["kind"] in {k.value for k in KERNEL_KINDS} and row["action"] in {a.value for a in Action}
            assert row["pci"] is None or PCI_OUT.fullmatch(row["pci"])
            assert row["xid"] is None or 0 <= row["xid"] < 10**9
    else:
        assert stdout.strip()
