"""Read GPU faults out of the kernel log.

`KernelLogParser` turns kernel-log lines into `KernelFault`s: NVRM XID lines, NVSwitch
SXid lines, and the multi-line "fallen off the bus" message, which carries no XID at all
(a known blind spot of monitors that only look for XIDs). It accepts the prefixes the
same line gets from different tools: dmesg `[ 1843.308145] `, `dmesg -T`
`[Fri Aug 30 11:43:14 2024] `, journald/syslog `Aug 30 11:43:14 host kernel: ` (or an
ISO-8601 timestamp), /dev/kmsg `6,1234,5678,-;`, or none.

`KernelLogFollower` tails a file (or /dev/kmsg) from a durable position kept in the
store, so an agent restart neither loses nor repeats lines; it survives truncation and
rotation.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from aidc.events import FaultKind

_PREFIXES = [
    re.compile(r"^<\d+>"),                                             # printk level, e.g. <3>
    re.compile(r"^\d+,\d+,\d+,[^;]*;"),                                # /dev/kmsg record header
    re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?\s+\S+\s+kernel:\s*"),
    re.compile(r"^[A-Z][a-z]{2}\s+\d{1,2}\s+\d\d:\d\d:\d\d\s+\S+\s+kernel:\s*"),  # syslog / journald
    re.compile(r"^\[[A-Z][a-z]{2}\s+[A-Z][a-z]{2}\s+\d{1,2}\s+\d\d:\d\d:\d\d\s+\d{4}\]\s*"),  # dmesg -T
    re.compile(r"^\[\s*\d+\.\d+\]\s*"),                                # dmesg
]

_XID = re.compile(r"NVRM: Xid \((?:PCI:)?([0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?)\):\s*(\d+),?\s*(.*)$")
_SXID = re.compile(r"nvidia-nvswitch(\d+): SXid \((?:PCI:)?([0-9A-Fa-f:.]+)\):\s*(\d+),\s*(Non-fatal|Fatal)?,?\s*(.*)$",
                   re.IGNORECASE)
# The driver prints each SXid as three lines under the same "SXid (PCI:..): <code>," prefix:
# the report (with its severity), then "Severity N Engine instance .." and "Data {..}".
# Only the report is the fault; the other two are its details.
_SXID_DETAIL = re.compile(r"^(?:Severity\s|Data\s*\{)")
_FOB_GPU = re.compile(r"NVRM: The NVIDIA GPU ([0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?)\s*$")
_FOB_MID = re.compile(r"NVRM: \(PCI ID: [0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}\) installed in this system has")
_FOB_END = re.compile(r"NVRM: fallen off the bus and is not responding to commands")
# Newer drivers also print a single line without an XID.
_FOB_ONE = re.compile(r"NVRM: GPU (?:at )?(?:PCI:)?([0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?):? "
                      r"GPU has fallen off the bus")


def strip_prefix(line: str) -> str:
    """The message without the timestamp/host prefix any of the supported sources add."""
    text = line.rstrip("\r\n")
    for _ in range(3):  # syslog lines may still carry dmesg's [seconds] after "kernel:"
        for rx in _PREFIXES:
            m = rx.match(text)
            if m:
                text = text[m.end():]
                break
        else:
            break
    return text


def normalize_pci(pci: str | None) -> str | None:
    """One spelling for a PCI address: NVML's `00000000:17:00.0` and the driver's
    `0000:17:00` both become `0000:17:00.0`."""
    if not pci:
        return None
    parts = pci.strip().lower().split(":")
    if len(parts) == 2:
        parts = ["0000"] + parts
    if len(parts) != 3:
        return pci
    domain, bus, devfn = parts
    dev, _, fn = devfn.partition(".")
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{int(fn or '0', 16)}"


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
    """Stateful line parser: the fallen-off-bus message spans lines (and may span reads)."""

    def __init__(self, state: dict | None = None):
        # The pending first line of a fallen-off-bus message: {"pci": ..., "lines": [...]}.
        self.pending: dict | None = (state or {}).get("pending")

    def state(self) -> dict:
        return {"pending": self.pending}

    def feed(self, line: str) -> list[KernelFault]:
        raw = line.rstrip("\r\n")
        text = strip_prefix(raw)
        m = _XID.search(text)
        if m:
            self.pending = None
            return [KernelFault(FaultKind.XID, int(m.group(2)), normalize_pci(m.group(1)), raw, text)]
        m = _SXID.search(text)
        if m:
            if m.group(4) is None and _SXID_DETAIL.match(m.group(5)):
                return []
            return [KernelFault(FaultKind.NVSWITCH_SXID, int(m.group(3)), normalize_pci(m.group(2)), raw, text,
                                severity=(m.group(4) or "").capitalize() or None)]
        m = _FOB_GPU.search(text)
        if m:
            self.pending = {"pci": normalize_pci(m.group(1)), "lines": [raw]}
            return []
        if _FOB_MID.search(text):
            if self.pending is not None:
                self.pending["lines"].append(raw)
            return []
        if _FOB_END.search(text):
            pending, self.pending = self.pending, None
            lines = (pending["lines"] if pending else []) + [raw]
            pci = pending["pci"] if pending else None
            message = "GPU has fallen off the bus and is not responding to commands (no XID line)"
            return [KernelFault(FaultKind.FALLEN_OFF_BUS, None, pci, " / ".join(lines), message)]
        m = _FOB_ONE.search(text)
        if m:
            return [KernelFault(FaultKind.FALLEN_OFF_BUS, None, normalize_pci(m.group(1)), raw, text)]
        return []


def parse_lines(lines) -> list[KernelFault]:
    parser = KernelLogParser()
    out: list[KernelFault] = []
    for line in lines:
        out += parser.feed(line)
    return out


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

    @staticmethod
    def position_key(node: str, path: str | os.PathLike) -> str:
        return f"health.kmsg_position:{node}:{os.path.abspath(path)}"

    def close(self) -> None:
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
            self.close()
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
        return chunk.decode("utf-8", errors="replace").splitlines()

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
