"""Read GPU faults out of the kernel log.

`KernelLogParser` turns kernel-log lines into `KernelFault`s: NVRM XID lines, NVSwitch
SXid lines, and the multi-line "fallen off the bus" message, which carries no XID at all
(a known blind spot of monitors that only look for XIDs).

Only the kernel speaks for the driver. `kernel_message` accepts a line when its source
format shows the kernel logged it, and returns the message: /dev/kmsg records
(`pri,seq,usec,flags;`), `dmesg -r` (`<pri>`) and `dmesg -x` (`kern  :err   : `) with the
kernel facility (pri >> 3 == 0); syslog and journald text (`-o short`, `short-iso`,
`short-precise`, `short-monotonic`, `short-unix`, `short-full`, RFC 3339) with the tag
`kernel:`; RFC 5424 syslog (rsyslog's protocol-23 template, systemd-netlogd) with the kernel
facility and APP-NAME `kernel`; `journalctl -o json` with `_TRANSPORT=kernel` (or, when that
field was left out, `SYSLOG_FACILITY=0`); and dmesg's own buffer (`[ 1843.308145] `,
`dmesg -T`, `dmesg -d`, `dmesg -e`, `--time-format iso`, or no prefix at all). The driver's text must then start the message, in
ASCII digits: `logger "NVRM: Xid ..."`, a USB product string or a sudo line that contains
the text is not a fault. What a format cannot show is not guessed: plain-text syslog cannot
tell a `logger -t kernel` line from the kernel's (journald JSON can), and plain dmesg shows
records root wrote into /dev/kmsg like the kernel's (`dmesg -x` and /dev/kmsg show their
user facility; util-linux 2.38's `dmesg -r` prints such a record as `<7>`, so a `<pri>` below
8 is only as good as the tool that printed it, as in /proc/kmsg).

A kernel line that starts like the driver's but cannot be read (a malformed PCI address, a
number longer than the driver prints) is skipped and reported through `on_unparsed`; the
parser never raises, so one line can never stop detection.

`KernelLogFollower` tails a file (or /dev/kmsg) from a durable position kept in the
store, so an agent restart neither loses nor repeats lines; it survives truncation and
rotation. `watch()` gives a descriptor that poll() finds readable when there may be
something new to read (/dev/kmsg itself, or inotify on the file's directory), so a caller
blocks until the kernel writes instead of polling.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from aidc.events import FaultKind
from aidc.polling import DirectoryWatch

# Every pattern is ASCII-only (re.ASCII): \d, \s and \w must not match full-width or other
# Unicode digits and spaces, which the kernel never prints but a forged line can.
_A = re.ASCII

# --- where a line came from ----------------------------------------------------------------
_KMSG_RECORD = re.compile(r"([0-9]{1,10}),[0-9]{1,20},[0-9]{1,20},[^;]{0,200};", _A)  # /dev/kmsg
_RAW_PRIORITY = re.compile(r"<([0-9]{1,10})>", _A)                          # /proc/kmsg, dmesg -r
_FACILITIES = ("kern|user|mail|daemon|auth|syslog|lpr|news|uucp|cron|authpriv|ftp|"
               "res[0-7]|local[0-7]")
_DECODED_FACILITY = re.compile(rf"({_FACILITIES}) *:(?:emerg|alert|crit|err|warn|notice|info|debug) *: ",
                               _A)                                                       # dmesg -x
# syslog and journald text: a time stamp, the host, then the tag ("kernel" for the kernel).
_SYSLOG = re.compile(
    r"(?:[A-Z][a-z]{2} +[0-9]{1,2} [0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"        # BSD; short, short-precise
    r"|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:Z|[+-][0-9]{2}:?[0-9]{2})?"                                                     # RFC 3339; short-iso
    r"|[0-9]{1,12}\.[0-9]{1,9}"                                                          # short-unix
    r"|[A-Z][a-z]{2} [0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} [A-Za-z0-9+-]{1,32}"  # short-full
    r") +(\S{1,255}) +([^\s:\[]{1,64})(?:\[[0-9]{1,10}\])?: ?", _A)
# RFC 5424 (rsyslog's RSYSLOG_SyslogProtocol23Format, systemd-netlogd forwarding the journal):
# <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG, "-" for a nil field.
# Structured data is one or more [id name="value" ...] elements; a value escapes '"', '\' and ']'.
_SD_NAME = r'[^\s="\]]{1,32}'
_SD_ELEMENT = rf'\[{_SD_NAME}(?: {_SD_NAME}="(?:[^"\\\]]|\\.){{0,1024}}"){{0,32}}\]'
_RFC5424 = re.compile(
    r"<([0-9]{1,3})>1 "
    r"(?:-|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})) "
    rf"[!-~]{{1,255}} ([!-~]{{1,48}}) [!-~]{{1,128}} [!-~]{{1,32}} (?:-|(?:{_SD_ELEMENT}){{1,16}})(?: |$)", _A)
_BOM = "\ufeff"  # RFC 5424 section 6.4: a UTF-8 MSG may start with the byte order mark
# dmesg's time stamps: seconds since boot, `dmesg -T`, `dmesg --time-format iso` (a comma
# before the fraction, unlike syslog's RFC 3339); `dmesg -d` adds the time since the previous
# message (`[ 1843.308145 <    0.000123>]`, `[<    0.000123>]` with -t); `dmesg -e` prints the
# minute when it changes (`[Aug30 11:43]`, strftime "%b%e %H:%M") and the delta otherwise
# (`[  +0.000123]`).
_DELTA = r"<[ ]*[0-9]{1,12}\.[0-9]{6}>"
_DMESG_TIME = re.compile(
    rf"(?:\[ *[0-9]{{1,12}}\.[0-9]{{1,9}}(?: {_DELTA})?\]"
    rf"|\[[A-Z][a-z]{{2}} [A-Z][a-z]{{2}} +[0-9]{{1,2}} [0-9]{{2}}:[0-9]{{2}}:[0-9]{{2}} [0-9]{{4}}(?: {_DELTA})?\]"
    rf"|\[{_DELTA}\]"
    r"|\[[A-Z][a-z]{2}[ 0-9][0-9] [0-9]{2}:[0-9]{2}\]"
    r"|\[ *[+-][0-9]{1,12}\.[0-9]{6}\]"
    r"|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2},[0-9]{1,9}[+-][0-9]{2}:?[0-9]{2}) ?", _A)
# journalctl -o short-monotonic: dmesg's seconds, then the host and the tag.
_MONOTONIC_KERNEL_TAG = re.compile(r"\S{1,255} kernel: ?", _A)


def _kernel_facility(priority: str) -> bool:
    """syslog priority = facility * 8 + level; facility 0 is the kernel (userspace cannot
    write facility 0 into /dev/kmsg: the kernel makes it 1, user)."""
    return int(priority) >> 3 == 0


def kernel_message(line: str) -> str | None:
    """The message of a line the kernel logged, without the prefix its source added; None for
    a line from anywhere else (another program's syslog tag, a userspace facility)."""
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        return _journal_json_message(text)
    m = _KMSG_RECORD.match(text)
    if m:  # a /dev/kmsg record: nothing else follows the header
        return text[m.end():] if _kernel_facility(m.group(1)) else None
    m = _RFC5424.match(text)
    if m:  # before <pri> alone, which would take the version "1" for the start of the message
        if not _kernel_facility(m.group(1)) or m.group(2) != "kernel":
            return None
        text = text[m.end():].removeprefix(_BOM)
    for origin in (_RAW_PRIORITY, _DECODED_FACILITY, _SYSLOG):
        m = origin.match(text)
        if m:
            if origin is _RAW_PRIORITY and not _kernel_facility(m.group(1)):
                return None
            if origin is _DECODED_FACILITY and m.group(1) != "kern":
                return None
            if origin is _SYSLOG and m.group(2) != "kernel":
                return None
            text = text[m.end():]
            break
    m = _DMESG_TIME.match(text)  # dmesg's own, or inside a syslog line (rsyslog's imklog keeps it)
    if m:
        text = text[m.end():]
        tag = _MONOTONIC_KERNEL_TAG.match(text)
        if tag:
            text = text[tag.end():]
    return text


def _journal_json_message(text: str) -> str | None:
    """`journalctl -o json`: _TRANSPORT is set by journald itself, so it cannot be forged by
    the logging program (SYSLOG_FACILITY and SYSLOG_IDENTIFIER can)."""
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict):
        return None
    transport, facility = entry.get("_TRANSPORT"), entry.get("SYSLOG_FACILITY")
    if transport is not None:
        # A root write to /dev/kmsg also arrives by the kernel transport, with facility 1.
        if transport != "kernel" or facility not in (None, "0"):
            return None
    elif facility != "0":
        return None
    message = entry.get("MESSAGE")
    if isinstance(message, list) and all(type(b) is int and 0 <= b < 256 for b in message):
        message = bytes(message).decode("utf-8", errors="replace")  # journald's form for non-UTF-8
    return message if isinstance(message, str) else None


# --- the driver's messages, anchored at the start of the kernel message -------------------
_PCI_TEXT = r"((?:[0-9A-Fa-f]{1,8}:)?[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?)"
_CODE = r"([0-9]{1,9})"  # XID and SXid codes are far below 10**9; a longer number is not the driver's
_XID = re.compile(rf"NVRM: Xid \((?:PCI:)?{_PCI_TEXT}\): *{_CODE}(?:,(.*)| *)$", _A)
_SXID = re.compile(rf"nvidia-nvswitch[0-9]{{1,9}}: SXid \((?:PCI:)?{_PCI_TEXT}\): *{_CODE}, *(Non-fatal|Fatal)?,? *(.*)$",
                   re.IGNORECASE | _A)
# How a line the driver printed as an XID or SXid starts; one that does not then match the
# full pattern is an unreadable driver line, not an unrelated one.
_DRIVER_FAULT_START = re.compile(r"NVRM: Xid\b|nvidia-nvswitch[^:\s]{0,12}: *SXid\b", re.IGNORECASE | _A)
# The driver prints each SXid as three lines under the same "SXid (PCI:..): <code>," prefix:
# the report (with its severity), then "Severity N Engine instance .." and "Data {..}".
# Only the report is the fault; the other two are its details.
_SXID_DETAIL = re.compile(r"(?:Severity\s|Data\s*\{)", _A)
_FOB_GPU = re.compile(r"NVRM: The NVIDIA GPU ([0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?) *$", _A)
_FOB_MID = re.compile(r"NVRM: \(PCI ID: [0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}\) installed in this system has", _A)
_FOB_END = re.compile(r"NVRM: fallen off the bus and is not responding to commands", _A)
_FOB_LINES = 3  # the multi-line message: GPU, PCI ID, "fallen off the bus"
# Newer drivers also print a single line without an XID.
_FOB_ONE = re.compile(r"NVRM: GPU (?:at )?(?:PCI:)?([0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?):? "
                      r"GPU has fallen off the bus", _A)
_PCI_ADDRESS = re.compile(r"(?:([0-9a-f]{1,8}):)?([0-9a-f]{1,2}):([0-9a-f]{1,2})(?:\.([0-7]))?", _A)


def parse_pci(text: str | None) -> str | None:
    """`0000:17:00.0` for a PCI address in any of its spellings (NVML's `00000000:17:00.0`,
    the driver's `0000:17:00`, `17:00.0`); None when the text is not one (a device number
    is 5 bits, so at most 0x1f)."""
    m = _PCI_ADDRESS.fullmatch((text or "").strip().lower())
    if not m or int(m.group(3), 16) > 0x1F:
        return None
    domain, bus, dev, fn = m.group(1) or "0", m.group(2), m.group(3), m.group(4) or "0"
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"


def normalize_pci(pci: str | None) -> str | None:
    """One spelling for a PCI address: NVML's `00000000:17:00.0` and the driver's
    `0000:17:00` both become `0000:17:00.0`. Text that is not a PCI address is returned
    lower-cased, never an error."""
    if not pci:
        return None
    return parse_pci(pci) or pci.strip().lower()


class Unreadable(ValueError):
    """A kernel line that starts like a driver fault line but cannot be read."""


def _pci(text: str) -> str:
    pci = parse_pci(text)
    if pci is None:
        raise Unreadable(f"{text!r} is not a PCI address")
    return pci


@dataclass(frozen=True)
class KernelFault:
    kind: FaultKind
    xid: int | None
    pci: str | None
    line: str          # the raw line (for fallen-off-bus: the lines joined with " / ")
    message: str       # the message after the prefix
    severity: str | None = None  # SXid: "Fatal" / "Non-fatal"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d


class KernelLogParser:
    """Stateful line parser: the fallen-off-bus message spans lines (and may span reads).

    `feed` never raises. A kernel line that starts like the driver's but cannot be read is
    counted in `unparsed`, passed to `on_unparsed(line, why)`, and skipped."""

    # The kernel's records are under 1 KiB and a journald JSON line of one a few KiB: a
    # longer line is not a driver line, and is not scanned past this.
    MAX_LINE_CHARS = 16384

    def __init__(self, state: dict | None = None, on_unparsed: Callable[[str, str], None] | None = None):
        # The pending first line of a fallen-off-bus message: {"pci": ..., "lines": [...]}.
        self.pending: dict | None = _valid_pending(state)
        self.on_unparsed = on_unparsed
        self.unparsed = 0

    def state(self) -> dict:
        return {"pending": self.pending}

    def feed(self, line: str) -> list[KernelFault]:
        raw = line.rstrip("\r\n")
        try:
            return self._parse(raw)
        except Unreadable as exc:
            why = str(exc)
        except Exception as exc:  # a parser bug must cost one line, never the follower
            why = f"parser error {exc!r}"
        self.unparsed += 1
        if self.on_unparsed is not None:
            self.on_unparsed(raw, why)
        return []

    def _parse(self, raw: str) -> list[KernelFault]:
        if len(raw) > self.MAX_LINE_CHARS:
            head = kernel_message(raw[: self.MAX_LINE_CHARS])
            if head is not None and _DRIVER_FAULT_START.match(head):
                raise Unreadable(f"a driver line longer than {self.MAX_LINE_CHARS} characters")
            return []
        text = kernel_message(raw)
        if text is None:
            return []
        m = _XID.match(text)
        if m:
            pci = _pci(m.group(1))
            self.pending = None
            return [KernelFault(FaultKind.XID, int(m.group(2)), pci, raw, text)]
        m = _SXID.match(text)
        if m:
            pci = _pci(m.group(1))
            if m.group(3) is None and _SXID_DETAIL.match(m.group(4)):
                return []
            return [KernelFault(FaultKind.NVSWITCH_SXID, int(m.group(2)), pci, raw, text,
                                severity=(m.group(3) or "").capitalize() or None)]
        if _DRIVER_FAULT_START.match(text):
            raise Unreadable("starts like an XID or SXid line but is not "
                             "'<Xid|SXid> (PCI:<address>): <code of at most 9 ASCII digits>, ...'")
        m = _FOB_GPU.match(text)
        if m:
            self.pending = {"pci": _pci(m.group(1)), "lines": [raw]}
            return []
        if _FOB_MID.match(text):
            if self.pending is not None and len(self.pending["lines"]) < _FOB_LINES - 1:
                self.pending["lines"].append(raw)
            return []
        if _FOB_END.match(text):
            pending, self.pending = self.pending, None
            lines = (pending["lines"] if pending else []) + [raw]
            pci = pending["pci"] if pending else None
            message = "GPU has fallen off the bus and is not responding to commands (no XID line)"
            return [KernelFault(FaultKind.FALLEN_OFF_BUS, None, pci, " / ".join(lines), message)]
        m = _FOB_ONE.match(text)
        if m:
            return [KernelFault(FaultKind.FALLEN_OFF_BUS, None, _pci(m.group(1)), raw, text)]
        return []


def _valid_pending(state) -> dict | None:
    """The saved start of a fallen-off-bus message, or None when the saved state is not one
    (written by an older version, or damaged): losing it costs one message's PCI address."""
    pending = state.get("pending") if isinstance(state, dict) else None
    if not isinstance(pending, dict):
        return None
    pci, lines = pending.get("pci"), pending.get("lines")
    if not (pci is None or isinstance(pci, str)) or not isinstance(lines, list) \
            or not all(isinstance(line, str) for line in lines):
        return None
    return {"pci": pci, "lines": lines[: _FOB_LINES - 1]}


def parse_lines(lines) -> list[KernelFault]:
    parser = KernelLogParser()
    out: list[KernelFault] = []
    for line in lines:
        out += parser.feed(line)
    return out


def read_lines(fh: BinaryIO, max_chars: int = KernelLogParser.MAX_LINE_CHARS) -> Iterator[str]:
    """The lines of a binary file, decoded (invalid UTF-8 replaced), split at line feeds only.
    A line longer than the parser reads is cut, and the rest of it skipped without holding it
    in memory; what is yielded for it is still longer than `max_chars` characters."""
    limit = 4 * max_chars + 1  # bytes: at least max_chars + 1 characters, however they decode
    while True:
        chunk = fh.readline(limit)
        if not chunk:
            return
        if len(chunk) == limit and not chunk.endswith(b"\n"):
            while True:  # the rest of the over-long line, one bounded read at a time
                rest = fh.readline(1 << 16)
                if not rest or rest.endswith(b"\n"):
                    break
        yield chunk.decode("utf-8", errors="replace")


@dataclass
class Position:
    """Where the follower is: file identity and byte offset (files), or last sequence (kmsg)."""

    dev: int = 0
    ino: int = 0
    offset: int = 0
    kmsg_seq: int = -1
    boot_id: str = ""  # /dev/kmsg sequence numbers restart at boot
    parser: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "Position":
        return cls(**json.loads(text)) if text else cls()


def current_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class KernelLogFollower:
    """Tail a kernel log from a durable position.

    `read()` returns the complete new lines and the position after them, without saving
    it; the caller saves the position (`position_key`) in the same store transaction as
    the events it derived, so a crash between the two repeats nothing and loses nothing.
    A partial last line waits for its newline. A file that shrank (truncated) is read
    from its start; a file replaced under the same name (rotated) is first drained to its
    end through the still-open handle, over as many calls as that takes, then the new file
    is read from its start. The position names the file by device and inode, so a restart
    while a rotated file is still being drained finds it again under its new name.
    """

    MAX_READ = 1 << 20  # bytes per call: bounded work per poll

    def __init__(self, path: str | os.PathLike, position: Position):
        self.path = Path(path)
        self.pos = position
        self._fh = None
        self._is_kmsg = False
        self._unread = False  # the last read stopped at MAX_READ before the file's end
        self._watch: DirectoryWatch | None = None

    @property
    def more_to_read(self) -> bool:
        """The last read() stopped at MAX_READ: read again without waiting."""
        return self._unread

    def watch(self) -> int | None:
        """A descriptor for poll() that is readable when read() may return something new;
        None when there is none (no inotify, the directory is missing): read every interval
        then. Call it before the read() after which you wait, so nothing written in between
        is missed. /dev/kmsg is its own: the kernel marks it readable as soon as a record
        follows the last one read (a blocking read would return it). A file is watched
        through its directory, which also sees it created, truncated and rotated (rename,
        new file under the name)."""
        if self._fh is None and not self._open():
            if not self.path.parent.is_dir():
                return None
        if self._is_kmsg:
            return self._fh
        if self._watch is None:
            name = self.path.name
            try:
                self._watch = DirectoryWatch(self.path.parent, lambda n: n.startswith(name))
            except OSError:
                return None
        return self._watch.fileno()

    def woken(self) -> bool:
        """After poll() found the watch readable: consume the notification; True when it
        was about the log (a file watch also hears its neighbours in the directory)."""
        if self._is_kmsg:
            return True
        return self._watch.changed() if self._watch is not None else True

    @staticmethod
    def position_key(node: str, path: str | os.PathLike) -> str:
        return f"health.kmsg_position:{node}:{os.path.abspath(path)}"

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._close_file()

    def _close_file(self) -> None:
        if self._fh is not None:
            if self._is_kmsg:
                os.close(self._fh)
            else:
                self._fh.close()
            self._fh = None

    def _open(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if stat.S_ISCHR(st.st_mode):
            self._is_kmsg = True
            self._fh = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            boot = current_boot_id()
            if boot != self.pos.boot_id:  # a new boot: its records are all new
                self.pos.boot_id, self.pos.kmsg_seq = boot, -1
            return True
        self._fh = open(self.path, "rb")
        fst = os.fstat(self._fh.fileno())
        if (fst.st_dev, fst.st_ino) != (self.pos.dev, self.pos.ino):
            if self.pos.ino:
                rotated = self._open_rotated()
                if rotated is not None:  # finish the file we left first; read() moves on when it is drained
                    self._fh.close()
                    self._fh = rotated
                    return True
                self.pos.offset = 0  # a different file than the one we left: start it from the top
            self.pos.dev, self.pos.ino = fst.st_dev, fst.st_ino
        return True

    def _open_rotated(self):
        """The file the position names, if it is still in this directory under a rotated
        name (kern.log.1, kern.log-20240830, ...); None when it is gone (deleted, compressed)."""
        try:
            names = sorted(n for n in os.listdir(self.path.parent)
                           if n.startswith(self.path.name) and n != self.path.name)
        except OSError:
            return None
        for name in names:
            try:
                fh = open(self.path.parent / name, "rb")
            except OSError:
                continue
            fst = os.fstat(fh.fileno())
            if (fst.st_dev, fst.st_ino) == (self.pos.dev, self.pos.ino) and stat.S_ISREG(fst.st_mode):
                return fh
            fh.close()
        return None

    def read(self) -> tuple[list[str], Position]:
        if self._fh is None and not self._open():
            return [], self.pos
        if self._is_kmsg:
            return self._read_kmsg()
        lines = self._read_file()
        if self._unread:  # more complete lines wait in this file: the next call reads on here
            return lines, self.pos
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return lines, self.pos
        if (st.st_dev, st.st_ino) != (self.pos.dev, self.pos.ino):
            # Rotated, and the old handle is drained to its end: switch to the new file.
            self._close_file()
            self.pos = Position(parser=self.pos.parser)
            if self._open():
                lines += self._read_file()
        return lines, self.pos

    def _read_file(self) -> list[str]:
        """Up to MAX_READ bytes of complete lines; sets `_unread` when the read stopped at
        MAX_READ before the end of the file."""
        self._unread = False
        size = os.fstat(self._fh.fileno()).st_size
        if size < self.pos.offset:  # truncated in place
            self.pos.offset = 0
        if size == self.pos.offset:
            return []
        self._fh.seek(self.pos.offset)
        data = self._fh.read(self.MAX_READ)
        self._unread = len(data) == self.MAX_READ and self.pos.offset + len(data) < size
        end = data.rfind(b"\n")
        if end < 0:
            # A line longer than MAX_READ would otherwise stop the follower for good: skip its head.
            if self._unread:
                self.pos.offset += len(data)
            return []
        chunk = data[: end + 1]
        self.pos.offset += len(chunk)
        # Split at "\n" only: str.splitlines() also splits at \x0b, \x1c, U+2028 and others,
        # which would start a new "line" in the middle of one the kernel logged.
        return [line.decode("utf-8", errors="replace") for line in chunk.split(b"\n")[:-1]]

    def _read_kmsg(self) -> tuple[list[str], Position]:
        """/dev/kmsg: one record per read; the record's sequence number is the position."""
        lines: list[str] = []
        for _ in range(4096):
            try:
                rec = os.read(self._fh, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten before we read them
                    continue
                raise
            if not rec:
                break
            text = rec.decode("utf-8", errors="replace")
            header, _, _ = text.partition(";")
            try:
                seq = int(header.split(",")[1])
            except (IndexError, ValueError):
                continue
            if seq <= self.pos.kmsg_seq:
                continue
            self.pos.kmsg_seq = seq
            lines.append(text.split("\n", 1)[0])  # continuation lines (" KEY=value") dropped
        return lines, self.pos
