"""`aidc_goodput_ettr{job}` and the parts of the wall time, read from step logs on each scrape.

A collector rather than gauges set by a loop: a scrape sees the log as it is at that moment,
and a process that only serves metrics does no work between scrapes. A log is re-read only
when its size or modification time changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from aidc.goodput.accounting import CATEGORIES, account
from aidc.goodput.steplog import StepLogError, read_step_log


class GoodputCollector:
    def __init__(self, jobs: dict[str, str | os.PathLike]):
        self.jobs = {job: Path(path) for job, path in jobs.items()}
        self._cache: dict[str, tuple[tuple[int, int], object]] = {}
        self.read_errors: dict[str, str] = {}

    def _goodput(self, job: str, path: Path):
        try:
            st = path.stat()
        except OSError:
            self.read_errors[job] = f"{path}: no step log"
            return None
        key = (st.st_size, st.st_mtime_ns)
        cached = self._cache.get(job)
        if cached and cached[0] == key:
            return cached[1]
        try:
            g = account(read_step_log(path))
        except StepLogError as exc:  # the last good figure stays; the error is counted
            self.read_errors[job] = str(exc)
            return cached[1] if cached else None
        self.read_errors.pop(job, None)
        self._cache[job] = (key, g)
        return g

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        ettr = GaugeMetricFamily("aidc_goodput_ettr", "Effective training time ratio: productive training time / "
                                 "wall time of the job's allocation", labels=["job"])
        parts = GaugeMetricFamily("aidc_goodput_seconds", "The job's wall time by part (productive, checkpoint, "
                                  "detection, restart, lost, idle)", labels=["job", "part"])
        ok = GaugeMetricFamily("aidc_goodput_log_ok", "1 when the job's step log was read, 0 when it is missing "
                               "or does not follow its schema", labels=["job"])
        for job, path in self.jobs.items():
            g = self._goodput(job, path)
            ok.add_metric([job], 0.0 if job in self.read_errors else 1.0)
            if g is None:
                continue
            ettr.add_metric([job], g.ettr)
            for part in CATEGORIES:
                parts.add_metric([job, part], g.seconds[part])
        yield ettr
        yield parts
        yield ok


def serve(jobs: dict[str, str | os.PathLike], port: int, addr: str = "127.0.0.1"):
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GoodputCollector(jobs))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return server, thread
