"""The step log's schema is enforced: a bad log is one clear error, never a wrong figure."""

from __future__ import annotations

import json
import threading

import pytest

from aidc.goodput import StepLog, StepLogError, read_step_log


def test_records_written_through_the_api_read_back_in_order(tmp_path):
    log = StepLog(tmp_path / "g.jsonl", job="j", clock=lambda: 5.0)
    log.allocation()
    log.start(resumed_from=0, world=["a"])
    with log.step(1):
        pass
    log.checkpoint(1, 5.0, 5.0, "sync", size=10)
    log.end()
    kinds = [r["kind"] for r in read_step_log(tmp_path / "g.jsonl")]
    assert kinds == ["allocation", "start", "step", "checkpoint", "end"]


def test_a_step_that_raises_is_not_logged(tmp_path):
    log = StepLog(tmp_path / "g.jsonl", job="j")
    log.start(resumed_from=0)
    with pytest.raises(RuntimeError), log.step(1):
        raise RuntimeError("peer died")
    assert [r["kind"] for r in read_step_log(tmp_path / "g.jsonl")] == ["start"]


def test_concurrent_writers_never_interleave_lines(tmp_path):
    path = tmp_path / "g.jsonl"
    writers = [StepLog(path, job="j") for _ in range(4)]

    def write(log: StepLog, base: int) -> None:
        for n in range(200):
            log.step_done(base + n, 1.0, 2.0)

    threads = [threading.Thread(target=write, args=(w, i * 1000)) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_step_log(path)) == 800


@pytest.mark.parametrize("content, message", [
    ('{"v":1,"kind":"step","t":1}\n', "step record lacks 'step'"),
    ('{"v":1,"kind":"step","t":1,"step":1,"t0":2,"t1":1}\n', "ends (t1) before it starts (t0)"),
    ('{"v":2,"kind":"end","t":1}\n', "schema version 2"),
    ('{"v":1,"kind":"party","t":1}\n', "unknown kind 'party'"),
    ('{"v":1,"kind":"end","t":NaN}\n', "not a JSON object"),
    ('{"v":1,"kind":"step","t":1,"step":true,"t0":1,"t1":1}\n', "'step' is bool"),
    ('[1, 2]\n', "not a JSON object"),
    ('garbage\n{"v":1,"kind":"end","t":1}\n', ":1: not a JSON object"),
    ("", "has no records"),
])
def test_a_corrupt_step_log_is_one_error_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "g.jsonl"
    path.write_text(content)
    with pytest.raises(StepLogError, match=str(path).replace(".", r"\.")) as err:
        read_step_log(path)
    assert message in str(err.value)


def test_a_last_line_being_written_is_skipped_not_an_error(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"v": 1, "kind": "end", "t": 1}) + '\n{"v":1,"ki')
    assert len(read_step_log(path)) == 1


def test_a_missing_step_log_says_where_it_looked_and_who_writes_it(tmp_path):
    with pytest.raises(StepLogError, match="no step log there .*StepLog"):
        read_step_log(tmp_path / "none.jsonl")


def test_bad_input_on_the_cli_is_one_error_line(tmp_path, aidc_cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"v":1,"kind":"step","t":1}\n')
    for path in (bad, tmp_path / "missing.jsonl", tmp_path):
        r = aidc_cli("goodput", "report", "--job", str(path))
        assert r.returncode == 2
        assert r.stderr.startswith("aidc: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr
