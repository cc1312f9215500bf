"""Checkpoint storage on one node: what a checkpoint save and a restart ask of the volume.

* sequential write with fsync: one file written in 1 MiB blocks, then fsync, timed to the
  end of the fsync (a checkpoint is safe only then), in GB/s;
* sequential read: the same file read back after its pages were dropped from the page cache
  (fsync, then posix_fadvise DONTNEED: without it the read measures memory), in GB/s;
* small-file metadata: create, stat and unlink of `files` empty files (what sharded
  checkpoints and their manifests do), in operations per second.

Measured in a directory of its own under the node's checkpoint path, removed afterwards,
also after an error. Wall time: storage waits are the figure, not CPU.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from aidc.files import open_nofollow

BLOCK = 1 << 20

# Names of the node figures (judged against the fleet in aidc.burnin.judge).
STORAGE_METRICS = ("storage_write_gbps", "storage_read_gbps", "storage_metadata_ops")


@dataclass(frozen=True)
class StorageResult:
    path: str
    nbytes: int
    files: int
    write_gbps: float  # medians over the samples
    read_gbps: float
    metadata_ops: float  # create + stat + unlink operations per second
    samples: int
    read_cache_dropped: bool  # False where the kernel refused the fadvise (the read figure is then the cache's)

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        return {"storage_write_gbps": self.write_gbps, "storage_read_gbps": self.read_gbps,
                "storage_metadata_ops": self.metadata_ops}


class StorageBench:
    """One node's checkpoint-storage samples, one sample at a time (the runner interleaves nodes)."""

    def __init__(self, checkpoint_path: str | os.PathLike, nbytes: int, files: int):
        if nbytes < BLOCK:
            raise ValueError(f"storage burn-in needs at least {BLOCK} bytes, got {nbytes}")
        if files < 1:
            raise ValueError(f"storage burn-in needs at least one file for the metadata rate, got {files}")
        self.root = Path(checkpoint_path)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"checkpoint path {self.root} cannot be created: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise OSError(f"checkpoint path {self.root} is not writable by this user")
        self.nbytes, self.files = nbytes, files
        self.block = os.urandom(BLOCK)  # incompressible: compressing filesystems must really write it
        self.writes: list[float] = []
        self.reads: list[float] = []
        self.metadata: list[float] = []
        self.cache_dropped = True
        # One untimed round first: the first fsync and file creations on a path also pay for
        # journal and directory setup (a first metadata sample ran 10x slower here).
        self._timed_round(record=False)

    def sample(self) -> None:
        self._timed_round(record=True)

    def _timed_round(self, record: bool) -> None:
        work = self.root / f".aidc-burnin-{uuid.uuid4().hex[:12]}"
        work.mkdir()
        try:
            figures = (self._write(work / "seq.bin"), self._read(work / "seq.bin"), self._metadata(work / "meta"))
            if record:
                for series, value in zip((self.writes, self.reads, self.metadata), figures):
                    series.append(value)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _write(self, path: Path) -> float:
        blocks, tail = divmod(self.nbytes, BLOCK)
        started = time.perf_counter()
        fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(blocks):
                os.write(fd, self.block)
            if tail:
                os.write(fd, self.block[:tail])
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.nbytes / max(time.perf_counter() - started, 1e-9) / 1e9

    def _read(self, path: Path) -> float:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                self.cache_dropped = False
            started = time.perf_counter()
            total = 0
            while chunk := os.read(fd, BLOCK):
                total += len(chunk)
        finally:
            os.close(fd)
        if total != self.nbytes:
            raise OSError(f"read back {total} of {self.nbytes} bytes from {path}")
        return total / max(time.perf_counter() - started, 1e-9) / 1e9

    def _metadata(self, directory: Path) -> float:
        directory.mkdir()
        names = [str(directory / f"f{i:06d}") for i in range(self.files)]
        started = time.perf_counter()
        for name in names:
            os.close(open_nofollow(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        for name in names:
            os.stat(name)
        for name in names:
            os.unlink(name)
        return 3 * self.files / max(time.perf_counter() - started, 1e-9)

    def result(self) -> StorageResult:
        if not self.writes:
            raise ValueError("no storage samples taken")
        return StorageResult(str(self.root), self.nbytes, self.files, statistics.median(self.writes),
                             statistics.median(self.reads), statistics.median(self.metadata), len(self.writes),
                             self.cache_dropped)
