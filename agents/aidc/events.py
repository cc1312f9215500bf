"""The one event contract between the agent's stages.

Monitors (aidc.health) emit `FaultEvent`s; burn-in emits `BurninResult`s; failover
reads faults from the durable store (aidc.store) and records `Decision`s. Stages never
call each other's internals: they meet here and in the store, as NVSentinel's stages
meet in their `HealthEvent` store.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from dataclasses import dataclass, field


class Action(str, enum.Enum):
    """What to do about a fault, in NVIDIA's XID catalog vocabulary (mildest first)."""

    IGNORE = "ignore"
    RESTART_APP = "restart_app"
    RESET_GPU = "reset_gpu"
    REBOOT_NODE = "reboot_node"
    CONTACT_SUPPORT = "contact_support"


class FaultKind(str, enum.Enum):
    XID = "xid"
    FALLEN_OFF_BUS = "fallen_off_bus"
    ECC_DBE = "ecc_dbe"
    ROW_REMAP_PENDING = "row_remap_pending"
    ROW_REMAP_FAILURE = "row_remap_failure"
    THERMAL_THROTTLE = "thermal_throttle"
    NVLINK_DOWN = "nvlink_down"
    PCIE_DEGRADED = "pcie_degraded"
    DEVICE_HANG = "device_hang"
    NVSWITCH_SXID = "nvswitch_sxid"
    IB_PORT_DOWN = "ib_port_down"
    IB_LINK_FLAPPING = "ib_link_flapping"
    STRAGGLER = "straggler"  # slower than the fleet while training (aidc.health.stragglers)


@dataclass(frozen=True)
class FaultEvent:
    node: str
    kind: FaultKind
    action: Action
    message: str
    source: str  # "kmsg" | "device" | "watchdog"
    gpu: int | None = None
    pci: str | None = None
    xid: int | None = None
    line: str | None = None
    observed_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        # The fields are flat values (the enums are str): no deep copy as dataclasses.asdict
        # makes, which was most of the cost of storing an event at fleet scale.
        return json.dumps({f.name: getattr(self, f.name) for f in _EVENT_FIELDS}, default=lambda v: v.value,
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FaultEvent":
        data = json.loads(text)
        data["kind"], data["action"] = FaultKind(data["kind"]), Action(data["action"])
        return cls(**data)


_EVENT_FIELDS = dataclasses.fields(FaultEvent)


@dataclass(frozen=True)
class Decision:
    """What failover decided about one fault, and why."""

    node: str
    # "quarantine" | "already_quarantined" | "no_action" | "refused_blast_radius" | "refused_breaker_open"
    # | "would_quarantine" | "refused_unknown_node" | "quarantine_gpu" | "would_quarantine_gpu"
    verdict: str
    reason: str
    dry_run: bool
    event_id: int | None = None
    decided_at: float = field(default_factory=time.time)
