"""Time out every device call.

A sick GPU can make a driver call block forever; a monitor that blocks with it never
reports the fault (a known failure of other monitors). Calls run on one worker thread;
past the timeout the caller gets `DeviceHang`. Threads cannot be killed, so the stuck
call is kept: until it returns, every further call answers `DeviceHang` at once instead of
starting another call into the wedged driver (which would strand one thread per poll).
At most one thread per backend is ever stuck, and it is a daemon thread, so it never
keeps the process from exiting.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time

from aidc.device.base import DeviceBackend, GpuTelemetry, XidEvent
from aidc.errors import DeviceError, DeviceHang


class _Worker:
    """One daemon thread running calls in order. (ThreadPoolExecutor's workers are joined at
    interpreter exit, so one stuck in the driver would keep the process alive forever.)"""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"device-call-{name}", daemon=True).start()

    def submit(self, fn, *args) -> cf.Future:
        future: cf.Future = cf.Future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        self._calls.put(None)  # ends the thread once the call in hand (if any) returns

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller as is
                future.set_exception(exc)


class TimedBackend:
    def __init__(self, backend: DeviceBackend, timeout_s: float):
        self.inner, self.timeout_s, self.name = backend, timeout_s, backend.name
        self._lock = threading.Lock()
        self._worker = _Worker(backend.name)
        self._closed = False
        # The call that timed out and has not returned yet: (future, what, when it started).
        self._stuck: tuple[cf.Future, str, float] | None = None
        # Every call answered with DeviceHang, whether it timed out or was refused because an
        # earlier call is still stuck: to the caller both are a hung device.
        self.hung_calls = 0

    def _call(self, what: str, fn, *args, timeout_s: float | None = None):
        timeout_s = timeout_s or self.timeout_s
        with self._lock:
            if self._closed:
                raise DeviceError(f"{self.name}: {what}: backend is closed")
            if self._stuck is not None:
                stuck, stuck_what, since = self._stuck
                if not stuck.done():
                    self.hung_calls += 1
                    raise DeviceHang(f"{self.name}: {what} not attempted: {stuck_what} has not returned "
                                     f"for {time.monotonic() - since:.1f} s")
                self._stuck = None  # the wedged call came back (its late answer is dropped)
            started = time.monotonic()
            future = self._worker.submit(fn, *args)
        try:
            return future.result(timeout=timeout_s)
        except cf.TimeoutError:
            with self._lock:
                self.hung_calls += 1
                # A call still queued behind another caller's never started: withdraw it. A
                # running one is the stuck call, unless an earlier stuck call is still recorded.
                if not future.cancel() and (self._stuck is None or self._stuck[0].done()):
                    self._stuck = (future, what, started)
            raise DeviceHang(f"{self.name}: {what} did not return within {timeout_s:.1f} s") from None

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

    def result_corruption(self, index: int) -> float | None:
        return self._call(f"result_corruption(gpu {index})", self.inner.result_corruption, index)

    def sysfs_root(self) -> str:
        return self._call("sysfs_root", self.inner.sysfs_root)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._worker.stop()
        self.inner.close()
