"""Time out every device call.

A sick GPU can make a driver call block forever; a monitor that blocks with it never
reports the fault (a known failure of other monitors). Each call runs on a worker
thread; past the timeout the caller gets `DeviceHang` and the stuck thread is
abandoned (threads cannot be killed), with a fresh worker for the next call.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading

from aidc.device.base import DeviceBackend, GpuTelemetry, XidEvent
from aidc.errors import DeviceHang


class TimedBackend:
    def __init__(self, backend: DeviceBackend, timeout_s: float):
        self.inner, self.timeout_s, self.name = backend, timeout_s, backend.name
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self.hung_calls = 0

    @staticmethod
    def _new_pool() -> cf.ThreadPoolExecutor:
        return cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-call")

    def _call(self, what: str, fn, *args, timeout_s: float | None = None):
        with self._lock:
            future = self._pool.submit(fn, *args)
        try:
            return future.result(timeout=timeout_s or self.timeout_s)
        except cf.TimeoutError:
            with self._lock:
                self.hung_calls += 1
                # Abandon the stuck worker; the next call gets a new one.
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            raise DeviceHang(f"{self.name}: {what} did not return within {timeout_s or self.timeout_s:.1f} s") from None

    def gpu_count(self) -> int:
        return self._call("gpu_count", self.inner.gpu_count)

    def telemetry(self, index: int) -> GpuTelemetry:
        return self._call(f"telemetry(gpu {index})", self.inner.telemetry, index)

    def xid_events(self, timeout_ms: int = 0) -> list[XidEvent]:
        return self._call("xid_events", self.inner.xid_events, timeout_ms,
                          timeout_s=self.timeout_s + timeout_ms / 1000)

    def torch_device(self, index: int) -> str:
        return self.inner.torch_device(index)

    def compute_slowdown(self) -> float:
        return self._call("compute_slowdown", self.inner.compute_slowdown)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.inner.close()
