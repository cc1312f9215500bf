"""TimedBackend against a wedged driver: a hung call is a DeviceHang, and the stuck call is
the only one; no call is started into the driver while it is stuck, so threads cannot pile
up, and a stuck call never keeps the process from exiting."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
from aidc.device.timed import TimedBackend
from aidc.errors import DeviceHang
from aidc.polling import wait_for


class WedgedDriver:
    """gpu_count blocks until `unwedge` is set, like a driver call on a sick GPU."""

    name = "wedged"

    def __init__(self):
        self.unwedge = threading.Event()
        self.calls = 0

    def gpu_count(self) -> int:
        self.calls += 1
        self.unwedge.wait(timeout=60)  # bounded, so a failing test cannot hang the run
        return 1

    def close(self) -> None:
        pass


def test_while_a_call_is_stuck_further_calls_answer_device_hang_without_entering_the_driver():
    driver = WedgedDriver()
    dev = TimedBackend(driver, 0.05)
    threads_before = threading.active_count()
    try:
        with pytest.raises(DeviceHang, match="gpu_count did not return"):
            dev.gpu_count()
        for _ in range(20):  # the agent's poller keeps polling while the device is wedged
            with pytest.raises(DeviceHang):
                dev.gpu_count()
        assert driver.calls == 1, "one call is stuck in the driver; no further call may join it"
        assert threading.active_count() == threads_before, "no thread per hung poll"
        assert dev.hung_calls == 21, "every call the caller could not have answered counts as hung"

        driver.unwedge.set()  # the driver recovers: calls are made and answered again
        assert wait_for("a device call to answer again", lambda: _answers(dev), timeout_s=10) == 1
        assert driver.calls >= 2
    finally:
        driver.unwedge.set()
        dev.close()


def _answers(dev: TimedBackend):
    try:
        return dev.gpu_count()
    except DeviceHang:  # the stuck call has not finished handing back its (dropped) answer yet
        return None


def test_a_call_stuck_forever_does_not_keep_the_process_from_exiting():
    code = textwrap.dedent("""
        import threading
        from aidc.device.timed import TimedBackend
        from aidc.errors import DeviceHang
        class Forever:
            name = "forever"
            def gpu_count(self):
                threading.Event().wait()  # never returns
            def close(self):
                pass
        dev = TimedBackend(Forever(), 0.05)
        try:
            dev.gpu_count()
        except DeviceHang:
            print("hang")
        dev.close()
    """)
    # Bounded: before the fix this process never exits and the timeout fails the test.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert (r.returncode, r.stdout) == (0, "hang\n"), r.stderr
