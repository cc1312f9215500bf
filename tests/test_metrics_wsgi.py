"""One port per daemon: /healthz and /readyz from aidc.probes, /metrics from prometheus_client's
own WSGI app (content negotiation, gzip, `name[]` filters come with it), except the agent's,
whose text must match dcgm-exporter's (aidc.health.exporter.render)."""

from __future__ import annotations

import gzip
import json
import urllib.request

from aidc.failover.metrics import FailoverMetrics
from aidc.probes import Probe


def get(url: str, **headers) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_the_controllers_metrics_come_from_prometheus_client_beside_the_probes():
    metrics, probe = FailoverMetrics(), Probe("failover-controller", 30.0)
    metrics.breaker(True)
    server = metrics.serve(0, probe=probe)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        _, _, body = get(f"{base}/metrics?name[]=aidc_failover_breaker_open")  # prometheus_client's filter
        families = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}
        assert families == {"aidc_failover_breaker_open"}
        assert "aidc_failover_breaker_open 1.0" in body.decode()
        _, headers, body = get(f"{base}/metrics", **{"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip" and b"aidc_failover_lease_held" in gzip.decompress(body)
        probe.turned()
        status, _, body = get(f"{base}/healthz")
        assert status == 200 and json.loads(body)["component"] == "failover-controller"
    finally:
        metrics.shutdown()
