"""Real Prometheus and Alertmanager (Debian's binaries) on loopback, for the lab, the
end-to-end tests and bench/alert_latency.py.

Settings that make the path take about a second (measured on this kind of machine): 1 s
scrape and evaluation, `group_wait: 0s`, `group_interval: 1s`, and Prometheus' alert
resend delay at 1 s. Alertmanager gets `--cluster.listen-address=` (empty) so it does not
gossip on 0.0.0.0:9094. Everything started here is stopped by `stop()`, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aidc.files import SHARED_MODE, shared_opener, write_atomic

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"  # Debian's name for the alertmanager binary

from aidc.polling import free_port  # noqa: F401  (re-exported: tests and bench use it)


def missing_binaries() -> list[str]:
    return [b for b in (PROMETHEUS, ALERTMANAGER) if shutil.which(b) is None]


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


@dataclass
class PromStack:
    workdir: Path
    targets: dict[str, int]              # node name -> agent metrics port on 127.0.0.1
    rules_file: Path
    webhook_url: str
    token_file: Path | None              # bearer token for the receiver; None: no Authorization header
    repeat_interval: str = "10s"
    # Alertmanager's webhook tls_config (ca_file, cert_file, key_file): HTTPS / mutual TLS to the receiver
    webhook_tls: dict | None = None
    # The failover controllers' --metrics-port on 127.0.0.1 (AidcFailover* alerts read their series).
    controller_ports: list[int] = field(default_factory=list)
    prom_port: int = field(default_factory=free_port)
    am_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.am_port}"

    def _write_configs(self) -> tuple[Path, Path]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        am = {
            "route": {"receiver": "aidc", "group_by": ["alertname", "Hostname"], "group_wait": "0s",
                      "group_interval": "1s", "repeat_interval": self.repeat_interval},
            "receivers": [{"name": "aidc", "webhook_configs": [{
                "url": self.webhook_url, "send_resolved": False, "http_config": self._webhook_http_config(),
            }]}],
        }
        prom = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(self.rules_file)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.am_port}"]}]}]},
            "scrape_configs": [{
                "job_name": "aidc-agent",
                # `Hostname` as a target label gives `up` the node name the alert rules group by.
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"Hostname": node}}
                                   for node, port in self.targets.items()],
            }, *([{
                "job_name": "aidc-failover-controller",
                "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in self.controller_ports]}],
            }] if self.controller_ports else []), *self._receiver_job()],
        }
        am_file, prom_file = self.workdir / "alertmanager.yml", self.workdir / "prometheus.yml"
        write_atomic(am_file, yaml.safe_dump(am), SHARED_MODE)
        write_atomic(prom_file, yaml.safe_dump(prom), SHARED_MODE)
        return am_file, prom_file

    def _receiver_job(self) -> list[dict]:
        """The runbook receiver's /metrics, on the address Alertmanager posts alerts to (and over
        the same TLS); none while there is no receiver."""
        url = urllib.parse.urlsplit(self.webhook_url)
        if not url.netloc:
            return []
        job = {"job_name": "aidc-runbook-receiver", "scheme": url.scheme, "metrics_path": "/metrics",
               "static_configs": [{"targets": [url.netloc]}]}
        if self.webhook_tls:
            job["tls_config"] = {key: str(value) for key, value in self.webhook_tls.items()}
        return [job]

    def _webhook_http_config(self) -> dict:
        config: dict = {}
        if self.token_file is not None:
            config["authorization"] = {"type": "Bearer", "credentials_file": str(self.token_file)}
        if self.webhook_tls:
            config["tls_config"] = {key: str(value) for key, value in self.webhook_tls.items()}
        return config

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "ab", opener=shared_opener)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=self.workdir)
        log.close()
        self.procs.append(proc)
        return proc

    def _wait_ready(self, url: str, proc: subprocess.Popen, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.workdir}/{name}.log")
            try:
                _get(url)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"{name} not ready within {timeout} s; see {self.workdir}/{name}.log")

    def start(self, timeout: float = 30.0) -> "PromStack":
        am_file, prom_file = self._write_configs()
        try:
            am = self._spawn([ALERTMANAGER, f"--config.file={am_file}", f"--storage.path={self.workdir / 'am-data'}",
                              f"--web.listen-address=127.0.0.1:{self.am_port}", "--cluster.listen-address="],
                             "alertmanager.log")
            self._wait_ready(f"{self.alertmanager_url}/-/ready", am, "alertmanager", timeout)
            prom = self._spawn([PROMETHEUS, f"--config.file={prom_file}",
                                f"--storage.tsdb.path={self.workdir / 'prom-data'}",
                                f"--web.listen-address=127.0.0.1:{self.prom_port}", "--web.enable-lifecycle",
                                "--rules.alert.resend-delay=1s"], "prometheus.log")
            self._wait_ready(f"{self.prometheus_url}/-/ready", prom, "prometheus", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def query(self, expr: str) -> list[dict]:
        body = json.loads(_get(f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        return body["data"]["result"]

    def targets_up(self) -> int:
        return sum(1 for r in self.query('up{job="aidc-agent"}') if r["value"][1] == "1")

    def push_alert(self, labels: dict, annotations: dict | None = None) -> None:
        """Post an alert straight to Alertmanager's API (as Prometheus would)."""
        data = json.dumps([{"labels": labels, "annotations": annotations or {}}]).encode()
        req = urllib.request.Request(f"{self.alertmanager_url}/api/v2/alerts", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                except ProcessLookupError:
                    pass
        self.procs.clear()
