"""The device layer: one interface for per-GPU telemetry and events, two backends.

`nvml` talks to the NVIDIA driver through nvidia-ml-py; `sim` is the lab's simulated
GPU, file-backed so that a fault injected by one process is seen by every other.
Every call goes through `TimedBackend`, because a hung driver call is itself a fault.
"""

from aidc.device.base import DeviceBackend, GpuTelemetry, XidEvent, open_backend
from aidc.device.timed import TimedBackend

__all__ = ["DeviceBackend", "GpuTelemetry", "XidEvent", "TimedBackend", "open_backend"]
