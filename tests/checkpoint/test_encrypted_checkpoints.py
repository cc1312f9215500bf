"""Encrypted checkpoints: a fresh data key each, bound to job and step; bad files fail whole, naming the file."""

from __future__ import annotations

import base64
import json
import os
import struct

import pytest
import torch

from aidc import checkpoint
from aidc.checkpoint import CheckpointDir, CheckpointError, load, read_header, rewrap, save
from aidc.kms.local import LocalKeyring

CHUNK = 1024  # small chunks: a few KiB of state spans many of them


@pytest.fixture
def keyring(tmp_path):
    return LocalKeyring.create(tmp_path / "keyring", "ckpt-key")


def _state() -> dict:
    return {"step": 7, "model": {"w": torch.arange(3000, dtype=torch.float32), "b": torch.ones(5, 3)}}


def _save(path, keyring, job="job-a", step=7, **kw):
    return save(path, _state(), job=job, step=step, kms=keyring, chunk_size=CHUNK, **kw)


def _same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_round_trip_records_key_version_and_hides_the_tensors(tmp_path, keyring):
    path = tmp_path / "step-7.ckpt"
    header = _save(path, keyring)
    assert header.to_dict() == {"job": "job-a", "step": 7, "cipher": "AES-256-GCM", "chunk_size": CHUNK,
                                "provider": "local", "key_id": "ckpt-key", "key_version": 1}
    assert read_header(path).to_dict() == header.to_dict()
    raw = path.read_bytes()
    assert raw.startswith(b"AIDCCKPT") and torch.arange(3000, dtype=torch.float32).numpy().tobytes()[:64] not in raw
    assert _same(load(path, job="job-a", kms=keyring), _state())


def test_every_save_uses_a_fresh_data_key(tmp_path, keyring):
    first, second = tmp_path / "a" / "step-7.ckpt", tmp_path / "b" / "step-7.ckpt"
    first.parent.mkdir(), second.parent.mkdir()
    a, b = _save(first, keyring), _save(second, keyring)
    assert a.wrapped.blob != b.wrapped.blob and a.nonce_prefix != b.nonce_prefix
    assert first.read_bytes()[read_header(first).header_len:] != second.read_bytes()[read_header(second).header_len:]


def test_a_checkpoint_renamed_to_another_step_does_not_load(tmp_path, keyring):
    _save(tmp_path / "step-7.ckpt", keyring)
    os.rename(tmp_path / "step-7.ckpt", tmp_path / "step-8.ckpt")
    with pytest.raises(CheckpointError, match=r"step-8.ckpt: header is bound to step 7, but step 8 was expected"):
        load(tmp_path / "step-8.ckpt", job="job-a", kms=keyring)


def test_editing_the_header_step_to_match_the_new_name_fails_authentication(tmp_path, keyring):
    _save(tmp_path / "step-7.ckpt", keyring)
    _rewrite_header(tmp_path / "step-7.ckpt", tmp_path / "step-8.ckpt", step=8)
    with pytest.raises(CheckpointError, match=r"step-8.ckpt: wrong key: the data key does not unwrap"):
        load(tmp_path / "step-8.ckpt", job="job-a", kms=keyring)


def test_a_checkpoint_of_another_job_is_refused(tmp_path, keyring):
    _save(tmp_path / "step-7.ckpt", keyring, job="job-b")
    with pytest.raises(CheckpointError, match=r"step-7.ckpt: header belongs to job 'job-b', not 'job-a'"):
        load(tmp_path / "step-7.ckpt", job="job-a", kms=keyring)


def test_a_header_from_another_job_on_this_payload_does_not_load(tmp_path, keyring):
    """Job b's valid header (its own wrapped key) spliced onto job a's payload of the same step."""
    a, b = tmp_path / "a" / "step-7.ckpt", tmp_path / "b" / "step-7.ckpt"
    a.parent.mkdir(), b.parent.mkdir()
    _save(a, keyring, job="job-a")
    _save(b, keyring, job="job-b")
    ha, hb = read_header(a), read_header(b)
    spliced = tmp_path / "step-7.ckpt"
    spliced.write_bytes(b.read_bytes()[:hb.header_len] + a.read_bytes()[ha.header_len:])
    with pytest.raises(CheckpointError, match=r"step-7.ckpt: payload chunk \d+ of \d+ fails authentication"):
        load(spliced, job="job-b", kms=keyring)
    # and job a's header edited to say job b: its wrapped key is bound to job a
    _rewrite_header(a, tmp_path / "edited" / "step-7.ckpt", job="job-b")
    with pytest.raises(CheckpointError, match="wrong key"):
        load(tmp_path / "edited" / "step-7.ckpt", job="job-b", kms=keyring)


def test_the_wrong_keyring_is_named(tmp_path, keyring):
    _save(tmp_path / "step-7.ckpt", keyring)
    other = LocalKeyring.create(tmp_path / "other", "ckpt-key")
    with pytest.raises(CheckpointError, match=r"step-7.ckpt: wrong key: the data key does not unwrap with key "
                                              r"'ckpt-key' version 1"):
        load(tmp_path / "step-7.ckpt", job="job-a", kms=other)
    stranger = LocalKeyring.create(tmp_path / "stranger", "another-key")
    with pytest.raises(CheckpointError, match="wrapped under key 'ckpt-key'; keyring .* holds 'another-key'"):
        load(tmp_path / "step-7.ckpt", job="job-a", kms=stranger)


def test_a_missing_key_version_is_named(tmp_path, keyring):
    keyring.rotate()
    _save(tmp_path / "step-7.ckpt", keyring)
    older = LocalKeyring.create(tmp_path / "older", "ckpt-key")
    with pytest.raises(CheckpointError, match=r"step-7.ckpt: key 'ckpt-key' version 2 is not in keyring"):
        load(tmp_path / "step-7.ckpt", job="job-a", kms=older)


def test_truncation_is_named_never_a_partial_load(tmp_path, keyring):
    path = tmp_path / "step-7.ckpt"
    _save(path, keyring)
    raw, h = path.read_bytes(), read_header(path)
    record = CHUNK + 16
    chunks = -(-(len(raw) - h.header_len) // record)
    cuts = {"at a chunk boundary": (h.header_len + (chunks - 1) * record, r"truncated: the payload ends after chunk"),
            "inside a chunk": (len(raw) - 100, r"payload chunk \d+ of \d+ fails authentication \(corrupted, truncated"),
            "inside the header": (h.header_len - 10, "truncated inside the header"),
            "before any payload": (h.header_len, "truncated: 0 payload bytes"),
            "to nothing": (0, "not an encrypted aidc checkpoint")}
    for what, (size, message) in cuts.items():
        path.write_bytes(raw[:size])
        with pytest.raises(CheckpointError, match=f"step-7.ckpt: {message}"):
            load(path, job="job-a", kms=keyring)


@pytest.mark.parametrize("where", ["first chunk", "middle chunk", "last byte"])
def test_a_flipped_payload_bit_fails_the_whole_load(tmp_path, keyring, where):
    path = tmp_path / "step-7.ckpt"
    _save(path, keyring)
    raw, h = bytearray(path.read_bytes()), read_header(path)
    offset = {"first chunk": h.header_len + 5, "middle chunk": (h.header_len + len(raw)) // 2,
              "last byte": len(raw) - 1}[where]
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"step-7.ckpt: payload chunk \d+ of \d+ fails authentication.*"
                                              "nothing loaded"):
        load(path, job="job-a", kms=keyring)


def test_parallel_and_single_thread_loads_agree_and_both_refuse_a_bad_chunk(tmp_path, keyring):
    path = tmp_path / "step-7.ckpt"
    _save(path, keyring)
    for threads in (1, 3):
        assert _same(load(path, job="job-a", kms=keyring, decrypt_threads=threads), _state())
    with pytest.raises(CheckpointError, match="decrypt_threads must be 1..64"):
        load(path, job="job-a", kms=keyring, decrypt_threads=0)
    raw, h = bytearray(path.read_bytes()), read_header(path)
    raw[h.header_len + 5 * (CHUNK + 16) + 3] ^= 0x01  # inside the big tensor, past its first chunks
    path.write_bytes(bytes(raw))
    for threads in (1, 3):
        with pytest.raises(CheckpointError, match=r"payload chunk 5 of \d+ fails authentication"):
            load(path, job="job-a", kms=keyring, decrypt_threads=threads)


def test_flipped_header_bits_are_named(tmp_path, keyring):
    path = tmp_path / "step-7.ckpt"
    _save(path, keyring)
    raw = path.read_bytes()
    bad_magic = bytearray(raw)
    bad_magic[0] ^= 1
    path.write_bytes(bytes(bad_magic))
    with pytest.raises(CheckpointError, match="step-7.ckpt: not an encrypted aidc checkpoint"):
        load(path, job="job-a", kms=keyring)
    path.write_bytes(raw)
    h = read_header(path)
    body = json.loads(raw[14:h.header_len])
    blob = bytearray(base64.b64decode(body["kms"]["wrapped_key"]))
    blob[20] ^= 1
    body["kms"]["wrapped_key"] = base64.b64encode(bytes(blob)).decode()
    _write_with_body(path, raw, h, body)
    with pytest.raises(CheckpointError, match="step-7.ckpt: wrong key"):
        load(path, job="job-a", kms=keyring)
    path.write_bytes(raw[:20] + b"\xff" + raw[21:])
    with pytest.raises(CheckpointError, match="step-7.ckpt: corrupt header"):
        load(path, job="job-a", kms=keyring)


def test_a_plain_torch_file_is_not_taken_for_a_checkpoint(tmp_path, keyring):
    torch.save(_state(), tmp_path / "step-7.ckpt")
    with pytest.raises(CheckpointError, match="step-7.ckpt: not an encrypted aidc checkpoint"):
        load(tmp_path / "step-7.ckpt", job="job-a", kms=keyring)


def test_a_file_name_without_a_step_needs_the_step(tmp_path, keyring):
    _save(tmp_path / "latest.ckpt", keyring)
    with pytest.raises(CheckpointError, match="latest.ckpt: cannot tell which step"):
        load(tmp_path / "latest.ckpt", job="job-a", kms=keyring)
    assert _same(load(tmp_path / "latest.ckpt", job="job-a", kms=keyring, step=7), _state())


def test_rotation_rewraps_the_data_key_and_leaves_the_payload_bytes_alone(tmp_path, keyring):
    path = tmp_path / "step-7.ckpt"
    _save(path, keyring)
    before = path.read_bytes()
    payload_before = before[read_header(path).header_len:]
    assert keyring.rotate() == 2
    assert _same(load(path, job="job-a", kms=keyring), _state())  # version 1 still unwraps
    assert rewrap(path, keyring) == (1, 2)
    after = read_header(path)
    assert after.wrapped.version == 2 and path.read_bytes()[after.header_len:] == payload_before
    assert _same(load(path, job="job-a", kms=keyring), _state())
    assert rewrap(path, keyring) == (2, 2)  # already current: nothing to do


def test_checkpoint_dir_keeps_the_newest_and_never_falls_back_silently(tmp_path, keyring):
    d = CheckpointDir(tmp_path / "ckpts", job="job-a", kms=keyring, keep=2, fsync=False)
    assert d.load_latest() is None
    for step in (1, 2, 3):
        d.save(step, {"step": step, "model": {"w": torch.full((4,), float(step))}})
    assert d.steps() == [2, 3] and not list(d.dir.glob(".*tmp"))
    step, state = d.load_latest()
    assert step == 3 and torch.equal(state["model"]["w"], torch.full((4,), 3.0))
    newest = d.path(3)
    newest.write_bytes(newest.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="step-00000003.ckpt"):
        d.load_latest()


def test_a_failed_save_leaves_no_file(tmp_path, keyring):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError):
        save(tmp_path / "step-1.ckpt", {"x": Unpicklable()}, job="j", step=1, kms=keyring)
    assert list(tmp_path.glob("*ckpt*")) == []


def _write_with_body(dst, raw: bytes, h, body: dict) -> None:
    encoded = json.dumps(body, sort_keys=True).encode()
    dst.write_bytes(struct.pack(">8sHI", checkpoint.MAGIC, checkpoint.FORMAT_VERSION, len(encoded)) + encoded
                    + raw[h.header_len:])


def _rewrite_header(src, dst, **fields) -> None:
    raw, h = src.read_bytes(), read_header(src)
    body = json.loads(raw[14:h.header_len])
    body.update(fields)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_with_body(dst, raw, h, body)


def test_a_rotation_by_another_process_applies_to_the_next_save_of_a_running_trainer(tmp_path, keyring):
    d = CheckpointDir(tmp_path / "ckpts", job="job-a", kms=keyring, keep=3, fsync=False)
    assert d.save(1, {"w": torch.zeros(2)}).wrapped.version == 1
    assert LocalKeyring(keyring.path).rotate() == 2  # `aidc kms rotate` elsewhere
    assert d.save(2, {"w": torch.ones(2)}).wrapped.version == 2
    assert read_header(d.path(1)).wrapped.version == 1  # untouched until re-wrapped, and still loads
    assert torch.equal(load(d.path(1), job="job-a", kms=keyring)["w"], torch.zeros(2))


def test_save_leaves_torchs_crc_setting_as_it_found_it(tmp_path, keyring):
    assert torch.serialization.get_crc32_options() is True
    _save(tmp_path / "step-7.ckpt", keyring)
    assert torch.serialization.get_crc32_options() is True
    assert _save(tmp_path / "step-7.ckpt", keyring, fsync=True).header_len == read_header(tmp_path / "step-7.ckpt").header_len


@pytest.mark.parametrize("body, message", [(b"[" * 30000 + b"]" * 30000, "corrupt header .not JSON"),
                                           (b'{"kms": {}}', "corrupt header .cipher None"),
                                           (b"x" * 70000, "corrupt header .length 70000")])
def test_junk_headers_are_named_not_a_traceback(tmp_path, keyring, body, message):
    path = tmp_path / "step-1.ckpt"
    path.write_bytes(struct.pack(">8sHI", checkpoint.MAGIC, checkpoint.FORMAT_VERSION, len(body)) + body)
    with pytest.raises(CheckpointError, match=f"step-1.ckpt: {message}"):
        load(path, job="j", kms=keyring)
