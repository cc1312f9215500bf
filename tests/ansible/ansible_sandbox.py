"""A disposable Ansible target on this machine that can never touch this machine's own files.

The target is an sshd reached without any network: Ansible's ssh connects through a
ProxyCommand that enters the sandbox's namespaces and runs `sshd -i` (inetd mode) there, so no
port is opened anywhere, not even on loopback. The sandbox is:

- a network namespace of its own (only `lo`): network sysctls and sysfs net entries are the
  namespace's own, and nothing the playbook does can reach a network;
- a mount namespace whose root is an overlay: lower layer this machine's `/` (read-only in
  effect: overlayfs never writes to a lower layer), upper layer a temporary directory. Every file
  the playbook writes lands in the upper directory, which is also the exact record of what it
  changed. /proc/sys and /sys are mounted read-only, /dev holds only null, zero, random and
  friends, /run and /tmp are fresh tmpfs.

It shares this machine's kernel, so the converge runs with `aidc_runtime_changes=false` (no live
sysctl, modprobe, governor or service changes) and, having no network, `aidc_manage_packages=false`.
Why not a container image or a VM: none is available offline here; the overlay gives a real
Debian 12 root with python3, apt and useradd for free, and the run needs no image download.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from aidc.ansible import PlaybookResult, run_playbook
from aidc.ansible.runner import SITE_PLAYBOOK
from aidc.polling import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
H100_STACK = HERE / "Pulumi.h100-fixture.yaml"
# The sandbox shares this machine's kernel and has no network: files only (see the module docstring).
SANDBOX_VARS = {"aidc_manage_packages": False, "aidc_runtime_changes": False}


def inventory_script(directory: Path, stack: str | Path) -> Path:
    """A dynamic-inventory script running `python -m aidc inventory` on `stack`, as users do."""
    script = directory / "inventory.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m aidc inventory --stack {stack} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def fake_sysfs(root: Path, gpu_device_id: str = "0x2330", gpus: int = 8, nvswitches: int = 4,
               hcas: int = 8) -> Path:
    """A sysfs tree as an HGX H100 node shows it before any driver is installed."""
    pci = root / "bus" / "pci" / "devices"

    def device(addr: str, vendor: str, device_id: str, klass: str) -> None:
        d = pci / addr
        d.mkdir(parents=True)
        for name, value in (("vendor", vendor), ("device", device_id), ("class", klass)):
            (d / name).write_text(value + "\n")

    for i in range(gpus):
        device(f"0000:{0x18 + i * 0x10:02x}:00.0", "0x10de", gpu_device_id, "0x030200")
    for i in range(nvswitches):
        device(f"0000:{0x05 + i:02x}:00.0", "0x10de", "0x22a3", "0x068000")
    device("0000:00:1f.0", "0x8086", "0x1234", "0x060100")  # not NVIDIA: ignored
    for i in range(hcas):
        port = root / "class" / "infiniband" / f"mlx5_{i}" / "ports" / "1"
        (port / "counters").mkdir(parents=True)
        values = {"link_layer": "InfiniBand", **IB_PORT_ACTIVE_NDR}
        for name, value in {**values, **{f"counters/{c}": str(n) for c, n in IB_PORT_COUNTERS.items()}}.items():
            (port / name).write_text(value + "\n")
    return root


# What ib_core shows for a healthy ConnectX-7 NDR port (the kernel's own formats).
IB_PORT_ACTIVE_NDR = {"state": "4: ACTIVE", "phys_state": "5: LinkUp", "rate": "400 Gb/sec (4X NDR)"}
IB_PORT_COUNTERS = {"link_downed": 0, "link_error_recovery": 0, "symbol_error": 0, "port_rcv_errors": 0,
                    "port_xmit_discards": 0, "port_rcv_remote_physical_errors": 0, "port_rcv_switch_relay_errors": 0,
                    "local_link_integrity_errors": 0, "excessive_buffer_overrun_errors": 0,
                    "port_xmit_constraint_errors": 0, "port_rcv_constraint_errors": 0, "VL15_dropped": 0}

SSHD = "/usr/sbin/sshd"
SANDBOX_ETC = "/etc/ssh/aidc-sandbox"  # inside the sandbox (written into the upper layer)

_SETUP = r"""
set -eu
M="$1"; U="$2"; W="$3"
mount -t overlay overlay -o "lowerdir=/,upperdir=$U,workdir=$W" "$M"
mount -t proc proc "$M/proc"
mount --bind "$M/proc/sys" "$M/proc/sys"
mount -o remount,bind,ro "$M/proc/sys"
mount -t sysfs -o ro sysfs "$M/sys"
mount -t tmpfs -o mode=0755,size=4m tmpfs "$M/dev"
for d in null zero full random urandom tty; do : > "$M/dev/$d"; mount --bind "/dev/$d" "$M/dev/$d"; done
mkdir "$M/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$M/dev/pts"
ln -s pts/ptmx "$M/dev/ptmx"
mount -t tmpfs -o mode=0755,size=16m tmpfs "$M/run"
mkdir -m 0755 "$M/run/sshd"
mount -t tmpfs -o mode=1777,size=256m tmpfs "$M/tmp"
echo ready
exec sleep 3600
"""


def missing_prerequisites() -> str | None:
    """Why the sandbox cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces, overlayfs)"
    if not os.path.exists(SSHD):
        return f"{SSHD} not found: install Debian's openssh-server (make system-deps)"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "chroot"):
        if not shutil.which(tool):
            return f"{tool} not found: install iproute2 / util-linux / openssh-client (make system-deps)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


class SandboxHost:
    """Start with `start()`, stop with `stop()` (always: it removes the namespace and the files)."""

    def __init__(self, base: Path):
        self.base = base
        self.upper = base / "upper"
        self.netns = f"aidc-ans-{os.getpid()}-{secrets.token_hex(3)}"
        self.key = base / "client_key"
        self.holder: subprocess.Popen | None = None
        self.peers: list[str] = []  # namespaces wired to this one (wire())

    # --- setup -----------------------------------------------------------------------------
    def _write_ssh_files(self) -> None:
        etc = self.upper / SANDBOX_ETC.lstrip("/")
        etc.mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "host_ed25519")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        (etc / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (etc / "sshd_config").write_text(
            f"HostKey {SANDBOX_ETC}/host_ed25519\n"
            f"AuthorizedKeysFile {SANDBOX_ETC}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile none\nLogLevel ERROR\nSubsystem sftp internal-sftp\n"
        )

    def start(self) -> "SandboxHost":
        for d in ("upper", "work", "merged"):
            (self.base / d).mkdir(parents=True)
        self._write_ssh_files()
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", _SETUP, "sandbox", str(self.base / "merged"), str(self.upper), str(self.base / "work")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.holder.stdout.readline().strip()  # the script prints "ready" or exits
        if line != "ready":
            err = self.holder.stderr.read() if self.holder.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"sandbox setup failed: {line} {err}".strip())
        return self

    # --- use -------------------------------------------------------------------------------
    def connection_vars(self) -> dict[str, object]:
        """Ansible variables that reach this sandbox (pass as extravars)."""
        proxy = (f"nsenter --target {self.holder.pid} --mount --net -- chroot {self.base / 'merged'} "
                 f"{SSHD} -i -f {SANDBOX_ETC}/sshd_config")
        return {
            "ansible_connection": "ssh",
            "ansible_host": "aidc-sandbox",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": (f'-o ProxyCommand="{proxy}" -o StrictHostKeyChecking=no '
                                        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"),
            "ansible_ssh_pipelining": True,
            # No compression (a local pipe gains nothing from it) and no sftp subsystem per file.
            "ansible_ssh_args": "-o ControlMaster=auto -o ControlPersist=300s",
            "ansible_ssh_transfer_method": "piped",
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def command(self, argv: list[str], *, user: str = "root", cwd: str = "/",
                env: dict[str, str] | None = None) -> list[str]:
        """The command line that runs `argv` inside the sandbox (its namespaces and root) as
        `user`, in `cwd`, with `env` and nothing of this process's environment (no PYTHONPATH)."""
        base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        inner = ["env", "-i", "-C", cwd, *(f"{k}={v}" for k, v in {**base, **(env or {})}.items())]
        if user != "root":
            inner += ["/usr/sbin/runuser", "-u", user, "--"]
        return ["nsenter", "--target", str(self.holder.pid), "--mount", "--net", "--",
                "chroot", str(self.base / "merged"), *inner, *argv]

    def wire(self, address: str, peer_address: str, prefix: int = 24) -> str:
        """A second network namespace joined to this one by a veth pair (this end `address`, the
        peer `peer_address`): a host on the network, such as a Prometheus server. Returns its name;
        `stop()` removes it."""
        peer = self.netns + "-p"
        subprocess.run(["ip", "netns", "add", peer], check=True)
        self.peers.append(peer)
        subprocess.run(["ip", "link", "add", "eth0", "netns", self.netns, "type", "veth",
                        "peer", "name", "eth0", "netns", peer], check=True)
        for ns, addr in ((self.netns, address), (peer, peer_address)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        return peer

    def written(self, path: str) -> Path:
        """Where a file the playbook wrote at `path` (absolute, inside the target) is on this machine."""
        return self.upper / path.lstrip("/")

    # --- teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.holder is not None:
            stop_process_group(self.holder)
        for ns in [self.netns, *self.peers]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        deadline = time.monotonic() + 5
        while Path(f"/run/netns/{self.netns}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def unit_service(text: str) -> dict:
    """What a systemd unit's [Service] section says about its main process: User,
    WorkingDirectory, Environment (a dict) and ExecStart (split as systemd splits it)."""
    import shlex

    section, out = None, {"Environment": {}}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            if key == "Environment":
                out["Environment"].update(item.split("=", 1) for item in shlex.split(value))
            elif key == "ExecStart":
                out["ExecStart"] = shlex.split(value)
            else:
                out[key] = value
    return out


class Target:
    """One sandbox plus the inventory of a stack; `converge()` runs site.yml on one node through the wrapper."""

    def __init__(self, sandbox: SandboxHost, inventory: Path, node: str, extravars: dict):
        self.sandbox, self.inventory, self.node, self.extravars = sandbox, inventory, node, extravars

    def converge(self, check: bool = False, diff: bool = False, tags: tuple[str, ...] = (),
                 on_event=None, timeout_s: int = 300, **extra) -> PlaybookResult:
        return run_playbook(SITE_PLAYBOOK, inventory=self.inventory, limit=self.node, check=check, diff=diff,
                            tags=tags, on_event=on_event, timeout_s=timeout_s,
                            extravars={**self.sandbox.connection_vars(), **SANDBOX_VARS, **self.extravars,
                                       **extra})
