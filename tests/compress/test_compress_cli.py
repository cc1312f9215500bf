"""`aidc compress bench` rejects bad arguments with exit 2 and no traceback."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--technique", "int4-magic"], "unknown technique"),
    (["--model", "resnet"], "unknown model"),
    (["--threads", "0"], "threads"),
    (["--sparsity", "lots"], "sparsity"),
])
def test_bad_arguments_exit_2_with_a_message_and_no_traceback(aidc_cli, args, message):
    proc = aidc_cli("compress", "bench", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert message in (proc.stderr + proc.stdout).lower()


def test_help_lists_the_options(aidc_cli):
    proc = aidc_cli("compress", "bench", "--help")
    assert proc.returncode == 0
    for opt in ("--quick", "--json", "--out", "--audit-db", "--technique", "--sparsity"):
        assert opt in proc.stdout
