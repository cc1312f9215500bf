"""What libraries print goes to the log, not the user's terminal: torch c10d's C++ warning on a
store read that times out (written to descriptor 2 directly), a Python warning and a torch
logger's message; the program's own stderr lines still reach the terminal, and descriptor 2
is the terminal again afterwards."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from datetime import timedelta
    from aidc.library_output import library_output_to

    import torch.distributed as dist

    with library_output_to(sys.argv[1]):
        server = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                               timeout=timedelta(seconds=1))
        client = dist.TCPStore("127.0.0.1", server.port, world_size=None, is_master=False,
                               timeout=timedelta(seconds=1))
        try:
            client.get("never-set")  # c10d: "waitForInput ... timed out" on descriptor 2
        except Exception:
            pass
        warnings.warn("a library's deprecation")
        logging.getLogger("torch.distributed.elastic").warning("a torch logger's message")
        print("progress: our own line", file=sys.stderr, flush=True)
    print("after: descriptor 2 is the terminal again", file=sys.stderr, flush=True)
""")


def test_library_messages_go_to_the_log_and_ours_to_the_terminal(tmp_path):
    pytest.importorskip("torch")
    log = tmp_path / "logs" / "libraries.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    terminal = out.stderr.splitlines()
    assert terminal == ["progress: our own line", "after: descriptor 2 is the terminal again"]
    kept = log.read_text()
    assert "[c10d]" in kept and "a library's deprecation" in kept and "a torch logger's message" in kept
