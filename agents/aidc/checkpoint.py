"""Encrypted checkpoints: `save` and `load` for any trainer, and the lab's checkpoint directory.

Each checkpoint gets a fresh AES-256 data key, wrapped by the KMS key (`aidc.kms`). File format
(version 1):

    magic "AIDCCKPT" | format u16 | header length u32 | header (JSON) | payload chunks

The header holds the job, the step, the cipher, the chunk size, a random nonce prefix and,
under "kms", the provider, key id, key version and the wrapped data key. The payload is
`torch.save`'s bytes cut into chunks, each sealed with AES-256-GCM (nonce = prefix, chunk
counter, last-chunk flag; the STREAM construction), so a reordered, dropped or appended chunk
fails, and a truncated file is told apart from a tampered one. Every chunk and the wrapped key
authenticate the header's bound fields (everything except "kms"): a header edited to another
job or step, or moved onto another file, does not open. The "kms" part is left unbound so that
rotation can re-wrap the data key (`rewrap`) without re-encrypting the payload.

`load` hands `torch.load` only authenticated chunks and stops at the first that fails: a bad
checkpoint is one clear error naming the file, never a partial load.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aidc.errors import AidcError
from aidc.files import refuse_link, shared_opener
from aidc.kms import KeyProvider, KmsError, MissingKeyVersion, UnwrapError, WrappedKey

MAGIC = b"AIDCCKPT"
FORMAT_VERSION = 1
CIPHER = "AES-256-GCM"
# 256 KiB: a chunk stays in the CPU cache between read, AES and write. With 4 MiB chunks the
# bench (bench/checkpoint_crypto.py, 256 MiB) gave save/load ratios 0.70/0.89, with 256 KiB 1.23/1.00
# (back to back, same machine); 1 MiB chunks loaded no faster than 256 KiB (0.94 vs 0.93-0.96).
CHUNK_SIZE = 256 << 10
TAG_BYTES = 16
_PREFIX = struct.Struct(">8sHI")
_MAX_HEADER = 64 << 10
_NONCE_PREFIX_BYTES = 7
STEP_FILE = re.compile(r"step-([0-9]{1,12})\.ckpt$")


class CheckpointError(AidcError):
    """A checkpoint cannot be written or loaded; the message names the file."""


@dataclass(frozen=True)
class Header:
    job: str
    step: int
    chunk_size: int
    nonce_prefix: bytes
    wrapped: WrappedKey
    provider: str
    header_len: int  # bytes before the payload

    def bound(self) -> bytes:
        """The header bytes every chunk and the wrapped key authenticate."""
        return _bound(self.job, self.step, self.chunk_size, self.nonce_prefix)

    def to_dict(self) -> dict:
        return {"job": self.job, "step": self.step, "cipher": CIPHER, "chunk_size": self.chunk_size,
                "provider": self.provider, "key_id": self.wrapped.key_id, "key_version": self.wrapped.version}


def _bound(job: str, step: int, chunk_size: int, nonce_prefix: bytes) -> bytes:
    fields = {"format": FORMAT_VERSION, "cipher": CIPHER, "chunk_size": chunk_size, "job": job, "step": step,
              "nonce_prefix": base64.b64encode(nonce_prefix).decode()}
    return MAGIC + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def _header_bytes(header: Header) -> bytes:
    body = {"format": FORMAT_VERSION, "cipher": CIPHER, "chunk_size": header.chunk_size, "job": header.job,
            "step": header.step, "nonce_prefix": base64.b64encode(header.nonce_prefix).decode(),
            "kms": {"provider": header.provider, "key_id": header.wrapped.key_id,
                    "key_version": header.wrapped.version,
                    "wrapped_key": base64.b64encode(header.wrapped.blob).decode()}}
    raw = json.dumps(body, sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw


class _EncryptingWriter(io.RawIOBase):
    """A write-only stream that seals what it is given chunk by chunk into `out`."""

    def __init__(self, out, key: bytes, header: Header):
        super().__init__()
        self._out, self._aead, self._aad = out, AESGCM(key), header.bound()
        self._prefix, self._chunk = header.nonce_prefix, header.chunk_size
        self._buf = bytearray()
        self._sealed = bytearray(self._chunk + TAG_BYTES)
        self._index = 0
        self.plain_bytes = 0

    def writable(self) -> bool:
        return True

    def _seal(self, data, final: bool) -> None:
        n = len(data) + TAG_BYTES
        self._aead.encrypt_into(_nonce(self._prefix, self._index, final), data, self._aad, memoryview(self._sealed)[:n])
        self._out.write(memoryview(self._sealed)[:n])
        self._index += 1

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        total = len(mv)
        self.plain_bytes += total
        # A chunk is sealed only once more data follows it: the last chunk carries the final flag.
        while len(mv):
            if not self._buf and len(mv) > self._chunk:
                self._seal(mv[:self._chunk], final=False)
                mv = mv[self._chunk:]
                continue
            take = min(self._chunk - len(self._buf), len(mv))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) == self._chunk and len(mv):
                self._seal(self._buf, final=False)
                self._buf.clear()
        return total

    def finish(self) -> None:
        self._seal(self._buf, final=True)
        self._buf.clear()


def save(path: str | os.PathLike, state: Any, *, job: str, step: int, kms: KeyProvider,
         fsync: bool = True, chunk_size: int = CHUNK_SIZE) -> Header:
    """`torch.save(state)` encrypted under a fresh data key, written atomically to `path`.

    The file appears complete or not at all (temp file + rename); `fsync=False` skips the
    flush to disk (survives a process crash, not a power loss)."""
    import torch

    path = Path(path)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: step must be an integer >= 0, not {step!r}")
    if not 1 <= chunk_size <= 1 << 30:
        raise CheckpointError(f"{path}: chunk_size {chunk_size} out of range")
    prefix = os.urandom(_NONCE_PREFIX_BYTES)
    try:
        data_key, wrapped = kms.new_data_key(_bound(job, step, chunk_size, prefix))
    except KmsError as exc:
        raise CheckpointError(f"{path}: cannot wrap the data key: {exc}") from None
    header = Header(job, step, chunk_size, prefix, wrapped, kms.provider, 0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    refuse_link(path)
    try:
        with open(tmp, "wb", buffering=0, opener=shared_opener) as f:
            f.write(_header_bytes(header))
            writer = _EncryptingWriter(f, data_key, header)
            with _without_torch_crc(torch):
                torch.save(state, writer)
            writer.finish()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:  # the rename itself must survive a power loss too
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Header(job, step, chunk_size, prefix, wrapped, kms.provider, len(_header_bytes(header)))


_crc_lock = threading.Lock()
_crc_users = 0
_crc_saved = True


@contextlib.contextmanager
def _without_torch_crc(torch):
    """torch's per-record CRC-32 is redundant under AES-GCM (every byte is authenticated) and
    cost ~20% of an encrypted save here. torch's switch is process-wide: it is turned off while
    any encrypted save runs and restored after the last one (a plain torch.save in another
    thread meanwhile writes a file without CRCs, which loads the same)."""
    global _crc_users, _crc_saved
    with _crc_lock:
        if _crc_users == 0:
            _crc_saved = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
        _crc_users += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_users -= 1
            if _crc_users == 0:
                torch.serialization.set_crc32_options(_crc_saved)


def _field(path: Path, body: dict, name: str, kind: type):
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{path}: corrupt header: {name!r} missing or not {kind.__name__}")
    return value


def read_header(path: str | os.PathLike) -> Header:
    """The header of a checkpoint file, checked for form (not yet authenticated)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read_header(path, f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None


def _read_header(path: Path, f) -> Header:
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
        raise CheckpointError(f"{path}: not an encrypted aidc checkpoint (no {MAGIC.decode()} magic)")
    _, version, length = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}; this build reads format {FORMAT_VERSION}")
    if length > _MAX_HEADER:
        raise CheckpointError(f"{path}: corrupt header (length {length} > {_MAX_HEADER})")
    raw = f.read(length)
    if len(raw) < length:
        raise CheckpointError(f"{path}: truncated inside the header")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: corrupt header (not JSON)") from None
    if not isinstance(body, dict) or not isinstance(body.get("kms"), dict):
        raise CheckpointError(f"{path}: corrupt header (no kms section)")
    if body.get("cipher") != CIPHER or body.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: corrupt header (cipher {body.get('cipher')!r}, format {body.get('format')!r})")
    k = body["kms"]
    try:
        prefix_bytes = base64.b64decode(_field(path, body, "nonce_prefix", str), validate=True)
        blob = base64.b64decode(_field(path, k, "wrapped_key", str), validate=True)
    except ValueError:
        raise CheckpointError(f"{path}: corrupt header (bad base64)") from None
    chunk = _field(path, body, "chunk_size", int)
    if len(prefix_bytes) != _NONCE_PREFIX_BYTES or not 1 <= chunk <= 1 << 30:
        raise CheckpointError(f"{path}: corrupt header (nonce prefix or chunk size)")
    wrapped = WrappedKey(_field(path, k, "key_id", str), _field(path, k, "key_version", int), blob)
    return Header(_field(path, body, "job", str), _field(path, body, "step", int), chunk, prefix_bytes, wrapped,
                  _field(path, k, "provider", str), _PREFIX.size + length)


def step_of(path: str | os.PathLike) -> int | None:
    """The step a checkpoint's file name claims (`...step-<n>.ckpt`), or None."""
    m = STEP_FILE.search(Path(path).name)
    return int(m.group(1)) if m else None


def _unwrap(path: Path, header: Header, kms: KeyProvider) -> bytes:
    try:
        return kms.unwrap(header.wrapped, header.bound())
    except MissingKeyVersion as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except UnwrapError as exc:
        raise CheckpointError(f"{path}: wrong key: {exc}") from None
    except KmsError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _open_checked(path: Path, job: str, kms: KeyProvider, step: int | None):
    """Open a checkpoint, check its header against the caller's job and step, unwrap its key."""
    expected_step = step if step is not None else step_of(path)
    if expected_step is None:
        raise CheckpointError(f"{path}: cannot tell which step this checkpoint should hold "
                              "(name it step-<n>.ckpt or pass the step)")
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        header = _read_header(path, f)
        if header.job != job:
            raise CheckpointError(f"{path}: header belongs to job {header.job!r}, not {job!r} "
                                  "(a checkpoint or header from another job)")
        if header.step != expected_step:
            raise CheckpointError(f"{path}: header is bound to step {header.step}, but step {expected_step} was "
                                  "expected (a renamed or moved checkpoint)")
        return f, header, _unwrap(path, header, kms)
    except BaseException:
        f.close()
        raise


def _layout(path: Path, header: Header, sealed_len: int) -> tuple[int, int]:
    """(chunk count, plaintext length) of a payload of `sealed_len` bytes."""
    record = header.chunk_size + TAG_BYTES
    count = max(1, -(-sealed_len // record))
    last_len = sealed_len - (count - 1) * record
    if last_len < TAG_BYTES:
        raise CheckpointError(f"{path}: truncated: {sealed_len} payload bytes end inside chunk {count - 1}")
    return count, sealed_len - count * TAG_BYTES


def _opens_as_middle(aead: AESGCM, header: Header, i: int, chunk, aad: bytes) -> bool:
    try:
        aead.decrypt(_nonce(header.nonce_prefix, i, False), bytes(chunk), aad)
        return True
    except InvalidTag:
        return False


class _DecryptingReader(io.RawIOBase):
    """The plaintext of a checkpoint as a seekable stream, decrypted chunk by chunk on demand.

    `torch.load` reads the zip directory at the end first, then each tensor record with
    `readinto` into the tensor's own storage: whole chunks are decrypted straight into that
    storage, so loading costs one pass over the data, as a plain `torch.load` does. A chunk is
    authenticated before any of its bytes are handed out; any chunk that fails stops the load
    with a CheckpointError, so the caller never gets a partly loaded state."""

    def __init__(self, path: Path, f, header: Header, key: bytes, count: int, plain_len: int,
                 pool: ThreadPoolExecutor | None = None, threads: int = 1):
        super().__init__()
        self._path, self._fd, self._h, self._count, self._len = path, f.fileno(), header, count, plain_len
        self._aead, self._aad = AESGCM(key), header.bound()
        self._record = header.chunk_size + TAG_BYTES
        self._buffers = threading.local()  # each decrypting thread reads into its own sealed buffer
        self._cache = bytearray(header.chunk_size)
        self._cached = -1
        self._pos = 0
        self._pool, self._threads = pool, threads

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _chunk_len(self, i: int) -> int:
        return self._h.chunk_size if i < self._count - 1 else self._len - i * self._h.chunk_size

    def _decrypt(self, i: int, dst: memoryview) -> None:
        final = i == self._count - 1
        n = self._chunk_len(i) + TAG_BYTES
        buffer = getattr(self._buffers, "sealed", None)
        if buffer is None:
            buffer = self._buffers.sealed = bytearray(self._record)
        sealed = memoryview(buffer)[:n]
        if os.preadv(self._fd, [sealed], self._h.header_len + i * self._record) != n:
            raise CheckpointError(f"{self._path}: changed while being read")
        try:
            self._aead.decrypt_into(_nonce(self._h.nonce_prefix, i, final), sealed, self._aad, dst)
        except InvalidTag:
            self._cached = -1
            if final and n == self._record and _opens_as_middle(self._aead, self._h, i, sealed, self._aad):
                raise CheckpointError(f"{self._path}: truncated: the payload ends after chunk {i} without its "
                                      "final chunk; nothing loaded") from None
            raise CheckpointError(f"{self._path}: payload chunk {i} of {self._count} fails authentication "
                                  "(corrupted, truncated, bit-flipped or tampered); nothing loaded") from None

    def check_final(self) -> None:
        """Authenticate the last chunk (it carries the final flag) first: a truncated file is named as such."""
        last = self._count - 1
        self._decrypt(last, memoryview(self._cache)[:self._chunk_len(last)])
        self._cached = last

    def readinto(self, buffer) -> int:
        dst = memoryview(buffer).cast("B")
        want = min(len(dst), max(0, self._len - self._pos))
        done, size = 0, self._h.chunk_size
        while done < want:
            i, offset = divmod(self._pos, size)
            take = min(want - done, self._chunk_len(i) - offset)
            if offset == 0 and take == self._chunk_len(i):
                # Whole chunks: straight into the caller's memory, several at once when a pool is given.
                whole = self._whole_chunks(i, dst[done:want])
                take = self._decrypt_many(i, whole, dst[done:done + sum(whole)])
            else:
                if self._cached != i:
                    self._decrypt(i, memoryview(self._cache)[:self._chunk_len(i)])
                    self._cached = i
                dst[done:done + take] = memoryview(self._cache)[offset:offset + take]
            done += take
            self._pos += take
        return done

    def _whole_chunks(self, first: int, dst: memoryview) -> list[int]:
        """Lengths of the whole chunks from `first` on that fit in `dst`."""
        lengths, room, i = [], len(dst), first
        while i < self._count and self._chunk_len(i) <= room:
            lengths.append(self._chunk_len(i))
            room -= lengths[-1]
            i += 1
        return lengths

    def _decrypt_many(self, first: int, lengths: list[int], dst: memoryview) -> int:
        """Decrypt chunks first.. into consecutive slices of `dst`. A tensor spans many chunks:
        with a pool they are read and decrypted by several threads at once (pread and the AEAD
        release the GIL), so one core reads while another decrypts. Every chunk is
        authenticated before this returns; the first failure is raised."""
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        if self._pool is None or len(lengths) < 2:
            for k, n in enumerate(lengths):
                self._decrypt(first + k, dst[offsets[k]:offsets[k] + n])
        else:
            # One contiguous run of chunks per thread: each reads ahead in file order, and a
            # tensor costs a few queue round trips rather than one per chunk.
            runs = self._threads
            bounds = [len(lengths) * r // runs for r in range(runs + 1)]

            def run(lo: int, hi: int) -> None:
                for k in range(lo, hi):
                    self._decrypt(first + k, dst[offsets[k]:offsets[k] + lengths[k]])

            spans = [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if lo < hi]
            # The calling thread decrypts the first run itself rather than waiting idle: one
            # hand-off fewer per tensor, which is what a busy machine charges for.
            futures = [self._pool.submit(run, lo, hi) for lo, hi in spans[1:]]
            errors = []
            try:
                run(*spans[0])
            except Exception as exc:  # wait for the helpers (they write into dst) before raising
                errors.append(exc)
            errors += [exc for exc in (f.exception() for f in futures) if exc is not None]
            if errors:
                raise errors[0]
        return sum(lengths)

    def read(self, size: int = -1) -> bytes:
        n = max(0, self._len - self._pos) if size is None or size < 0 else size
        out = bytearray(n)
        return bytes(out[:self.readinto(out)])


def _decrypt_threads() -> int:
    """Threads that read and decrypt a load's chunks: one per usable core, at least 2 (one
    reads while another decrypts), at most 8 (past that, the disk or memory bandwidth limits)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(2, min(8, cores))


def load(path: str | os.PathLike, *, job: str, kms: KeyProvider, step: int | None = None,
         map_location: Any = "cpu", decrypt_threads: int | None = None) -> Any:
    """Load an encrypted checkpoint written by `save` (tensors and plain containers only).

    `decrypt_threads`: threads that read and decrypt in parallel (default: one per core, 2-8;
    1: this thread alone, no pool)."""
    import torch

    path = Path(path)
    threads = _decrypt_threads() if decrypt_threads is None else decrypt_threads
    if not isinstance(threads, int) or not 1 <= threads <= 64:
        raise CheckpointError(f"{path}: decrypt_threads must be 1..64, not {decrypt_threads!r}")
    f, header, key = _open_checked(path, job, kms, step)
    # threads - 1 helpers: the calling thread decrypts one run of every tensor itself.
    pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="aidc-ckpt-decrypt") if threads > 1 else None
    with f, pool or contextlib.nullcontext():
        count, plain_len = _layout(path, header, os.fstat(f.fileno()).st_size - header.header_len)
        reader = _DecryptingReader(path, f, header, key, count, plain_len, pool, threads)
        reader.check_final()
        try:
            return torch.load(reader, map_location=map_location, weights_only=True)
        except CheckpointError:
            raise
        except Exception as exc:  # authenticated, yet not loadable: written by something else
            raise CheckpointError(f"{path}: decrypted, but torch.load refused it: "
                                  f"{str(exc).splitlines()[0][:200]}") from None


def rewrap(path: str | os.PathLike, kms: KeyProvider, fsync: bool = True) -> tuple[int, int]:
    """Re-wrap a checkpoint's data key under the provider's current KEK version.

    The payload bytes are copied unchanged (never decrypted or re-encrypted); the new file
    replaces the old atomically. Returns (old version, new version)."""
    path = Path(path)
    header = read_header(path)
    key = _unwrap(path, header, kms)
    try:
        wrapped = kms.wrap(key, header.bound())
    except KmsError as exc:
        raise CheckpointError(f"{path}: cannot wrap the data key: {exc}") from None
    if wrapped.version == header.wrapped.version:
        return header.wrapped.version, header.wrapped.version
    new = Header(header.job, header.step, header.chunk_size, header.nonce_prefix, wrapped, kms.provider, 0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.rewrap.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb", opener=shared_opener) as dst:
            dst.write(_header_bytes(new))
            src.seek(header.header_len)
            while block := src.read(CHUNK_SIZE):
                dst.write(block)
            if fsync:
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # e.g. pruned by its trainer meanwhile
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot re-wrap: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return header.wrapped.version, wrapped.version


class CheckpointDir:
    """A job's checkpoints in one directory: `step-<n>.ckpt`, the newest `keep` kept."""

    def __init__(self, directory: str | os.PathLike, job: str, kms: KeyProvider, keep: int = 2, fsync: bool = True):
        self.dir, self.job, self.kms, self.keep, self.fsync = Path(directory), job, kms, max(1, keep), fsync
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.ckpt"

    def steps(self) -> list[int]:
        return sorted(s for p in self.dir.iterdir() if (s := step_of(p)) is not None and p.name == self.path(s).name)

    def save(self, step: int, state: Any) -> Header:
        header = save(self.path(step), state, job=self.job, step=step, kms=self.kms, fsync=self.fsync)
        for old in self.steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        return header

    def load_latest(self) -> tuple[int, Any] | None:
        """The newest checkpoint's (step, state), or None when there is none. A bad newest
        checkpoint is an error, not a silent fall-back to an older one."""
        steps = self.steps()
        if not steps:
            return None
        return steps[-1], load(self.path(steps[-1]), job=self.job, kms=self.kms, step=steps[-1])


def snapshot(state: Any) -> Any:
    """A copy of `state` that later training cannot change: every tensor copied to host
    memory, containers rebuilt, anything else shared (ints, strings are immutable)."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return type(state)((k, snapshot(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class BackgroundCheckpointWriter:
    """Asynchronous checkpoints: `save` takes an in-memory snapshot on the caller's thread
    (the only time training stands still, besides waiting for a previous write) and a
    background thread encrypts and writes it through `CheckpointDir.save` (same format, same
    temp file + atomic rename, so a checkpoint is on disk whole or not at all).

    At most one write is in flight: a save while the previous write runs waits for it, as a
    synchronous checkpoint would. A failed write is raised by the next `save` or `wait`, never
    dropped. `on_durable(step, write_s)` is called on the writer thread once a checkpoint is
    renamed into place. One long-lived writer thread rather than one per checkpoint: starting a
    thread hands it the GIL, and the trainer then waited up to the interpreter's 5 ms switch
    interval for it back, more than a small model's whole synchronous save."""

    def __init__(self, ckpt_dir: CheckpointDir, on_durable=None):
        self.dir, self.on_durable = ckpt_dir, on_durable
        self._cond = threading.Condition()
        self._pending: tuple[int, Any] | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def save(self, step: int, state: Any) -> None:
        self.wait()
        snap = snapshot(state)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
                self._thread.start()
            self._pending, self._busy = (step, snap), True
            self._cond.notify_all()

    def _run(self) -> None:
        import time

        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                step, snap = self._pending
                self._pending = None
            t0 = time.perf_counter()
            try:
                self.dir.save(step, snap)
                written = time.perf_counter() - t0
                if self.on_durable is not None:
                    self.on_durable(step, written)
            except BaseException as exc:  # handed to the training thread at its next save/wait
                self._error = exc
            del snap
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the write in flight; False when it is still running after `timeout_s`."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy, timeout_s):
                return False
            error, self._error = self._error, None
        if error is not None:
            raise error
        return True
