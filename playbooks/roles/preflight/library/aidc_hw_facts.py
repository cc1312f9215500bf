#!/usr/bin/python
# Part of aidc (Apache-2.0). Reads the PCI bus and sysfs, so it works before any driver is installed.
"""Ansible module: find NVIDIA GPUs, NVSwitches and RDMA HCAs on a host from sysfs."""

from __future__ import annotations

DOCUMENTATION = r"""
module: aidc_hw_facts
short_description: Find NVIDIA GPUs, NVSwitches and RDMA HCAs from sysfs
description:
  - Scans the PCI bus (vendor 0x10de) for GPUs (class 0x0300/0x0302) and NVSwitches (class 0x0680),
    and /sys/class/infiniband for RDMA HCAs with each port's link layer. Needs no NVIDIA driver.
options:
  sysfs_root:
    description: Where sysfs is mounted (a fixture tree in tests).
    type: path
    default: /sys
  gpu_models:
    description: PCI device id (lower-case, 0x....) to aidc GPU model name.
    type: dict
    default: {}
author: aidc
"""

RETURN = r"""
gpus: {description: "GPUs found: pci, device_id, model", type: list, returned: always}
nvswitches: {description: "NVSwitches found: pci, device_id", type: list, returned: always}
hcas: {description: "RDMA HCAs: name, ports (port, link_layer)", type: list, returned: always}
nvidia_driver_loaded: {description: the nvidia kernel module is loaded, type: bool, returned: always}
cpufreq: {description: CPU frequency scaling is exposed, type: bool, returned: always}
"""

import os

from ansible.module_utils.basic import AnsibleModule

NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")  # VGA controller, 3D controller
NVSWITCH_CLASS = "0x0680"  # bridge, other: how NVSwitches enumerate


def _read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _listdir(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def scan(root, models):
    gpus, switches = [], []
    pci = os.path.join(root, "bus", "pci", "devices")
    for addr in _listdir(pci):
        dev = os.path.join(pci, addr)
        if _read(os.path.join(dev, "vendor")).lower() != NVIDIA_VENDOR:
            continue
        klass = _read(os.path.join(dev, "class")).lower()[:6]
        device_id = _read(os.path.join(dev, "device")).lower()
        if klass in GPU_CLASSES:
            gpus.append({"pci": addr, "device_id": device_id, "model": models.get(device_id, "unknown")})
        elif klass == NVSWITCH_CLASS:
            switches.append({"pci": addr, "device_id": device_id})
    hcas = []
    ib = os.path.join(root, "class", "infiniband")
    for name in _listdir(ib):
        ports = [{"port": int(p), "link_layer": _read(os.path.join(ib, name, "ports", p, "link_layer"))}
                 for p in _listdir(os.path.join(ib, name, "ports")) if p.isdigit()]
        hcas.append({"name": name, "ports": ports})
    return {
        "gpus": gpus,
        "nvswitches": switches,
        "hcas": hcas,
        "nvidia_driver_loaded": os.path.isdir(os.path.join(root, "module", "nvidia")),
        "cpufreq": os.path.isdir(os.path.join(root, "devices", "system", "cpu", "cpu0", "cpufreq")),
    }


def main():
    module = AnsibleModule(
        argument_spec={"sysfs_root": {"type": "path", "default": "/sys"},
                       "gpu_models": {"type": "dict", "default": {}}},
        supports_check_mode=True,
    )
    models = {str(k).lower(): v for k, v in module.params["gpu_models"].items()}
    module.exit_json(changed=False, **scan(module.params["sysfs_root"], models))


if __name__ == "__main__":
    main()
