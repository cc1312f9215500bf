"""Start and stop `aidc runbook serve` as a real subprocess (crash and end-to-end tests)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aidc import polling


class ServeProcess:
    def __init__(self, workdir: Path, token: str | None, extra: list[str], name: str = "serve"):
        self.workdir, self.token, self.extra, self.name = workdir, token, extra, name
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.scheme = "http"
        self.log = workdir / f"{name}.log"

    def start(self, timeout: float = 60) -> "ServeProcess":
        auth = []
        if self.token:  # None: the receiver authenticates by mutual TLS alone (extra names the files)
            token_file = self.workdir / "token"
            token_file.write_text(self.token)
            auth = ["--token-file", str(token_file)]
        self.log_handle = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aidc", "runbook", "serve", "--port", "0", *auth, *self.extra],
            stdout=self.log_handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.findall(r"ready on (https?)://127\.0\.0\.1:(\d+)/alerts", self.log.read_text())
            if m:
                self.scheme, self.port = m[-1][0], int(m[-1][1])
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"serve not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/alerts"

    def post(self, payload: dict) -> dict:
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc:
            polling.stop_process_group(self.proc)
        if getattr(self, "log_handle", None):
            self.log_handle.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    return polling.wait_for(what, predicate, timeout, interval, error=AssertionError)
