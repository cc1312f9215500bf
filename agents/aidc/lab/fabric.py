"""The lab's network fabric: one network namespace per node, one bridge per rail.

    switch namespace <tag>-sw (the lab's; nothing is made in the root namespace)
      br0 ─┬─ n0r0 ══ rail0 [node ns <tag>-gpu-0] rail1 ══ n0r1 ─┬─ br1
           ├─ n1r0 ══ rail0 [node ns <tag>-gpu-1] rail1 ══ n1r1 ─┤
           ...                                                    ...
      brm (management: rendezvous store, never shaped nor faulted) ── n<i>m ══ mgmt0 in each node ns

Every rail veth is shaped at both ends (`tc tbf`: what the node sends, and what the switch
sends to it) to the spec's `fabric.link_speed_gbps` scaled down to what this machine can
carry (`lab.fabric_rail_mbit`; the scale is printed and recorded). A link fault is real:
`inject_link` cuts a rail's tbf rate, drops packets with an nftables rule inside the node's
namespace (this kernel has no netem), or takes the rail down; each writes
`<node_dir>/links.json` for whatever reflects link state (the simulated IB ports).

Names derive from the lab directory (`lab_tag`), so two labs never collide, and
`teardown` removes every namespace with the lab's prefix: also those a killed lab left.
What was built is recorded in `<lab_dir>/fabric.json`.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import itertools
import json
import math
import os
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from aidc.errors import AidcError
from aidc.files import SHARED_MODE, write_atomic

FABRIC_FILE = "fabric.json"
LINKS_FILE = "links.json"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT_S = 10.0
NFT_TABLE = "aidc_fault"
# tbf needs a bucket of at least one rate-interval's worth of bytes (plus one MTU); at lab
# rates 256 kbit is accurate (measured) and latency bounds the queue.
TBF_BURST = "256kbit"
TBF_LATENCY = "50ms"


class FabricError(AidcError):
    """The lab fabric could not be built, changed or read."""


@dataclass
class NodeLinks:
    """One node's place on the fabric."""

    netns: str
    mgmt_addr: str  # on the management bridge: reaches the rendezvous store
    rail_addrs: list[str]  # rail r's address (no prefix), interface rail<r>
    switch_ports: list[str]  # the switch-side veth of each rail


@dataclass
class Fabric:
    """What `bring_up` built (persisted as `<lab_dir>/fabric.json`)."""

    lab_dir: str
    tag: str
    switch_ns: str
    rails: int
    spec_link_gbps: float  # the spec's per-rail link speed
    rail_mbit: float  # what a healthy rail is shaped to here
    store_addr: str  # the switch namespace's address on the management bridge
    prefixlen: int
    mgmt_cidr: str = ""  # the management bridge's subnet (where the rendezvous store is)
    nodes: dict[str, NodeLinks] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Lab rate / spec rate: a rail here carries this fraction of a real link."""
        return self.rail_mbit / (self.spec_link_gbps * 1000)

    @property
    def link_rate_gbps(self) -> float:
        """The scaled per-rail link rate (Gb/s, bits) that collectives are judged against."""
        return self.rail_mbit / 1000

    @property
    def ifnames(self) -> list[str]:
        return [f"rail{r}" for r in range(self.rails)]

    def describe(self) -> str:
        return (f"lab fabric: {len(self.nodes)} node namespaces, {self.rails} rail(s) shaped to"
                f" {self.rail_mbit:g} Mbit/s each = spec {self.spec_link_gbps:g} Gb/s x scale {self.scale:.3g}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(scale=self.scale, link_rate_gbps=self.link_rate_gbps)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Fabric":
        nodes = {name: NodeLinks(**links) for name, links in data["nodes"].items()}
        keep = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "nodes"}
        return cls(**keep, nodes=nodes)


def lab_tag(lab_dir: str | os.PathLike) -> str:
    """A short prefix unique to one lab directory (netns names must be short and distinct)."""
    digest = hashlib.sha256(str(Path(lab_dir).resolve()).encode()).hexdigest()[:8]
    return f"aidc{digest}"


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise FabricError(f"{argv[0]} is not installed (`make system-deps` installs iproute2 and nftables)") from None
    except subprocess.TimeoutExpired:
        raise FabricError(f"`{' '.join(argv)}` did not finish in {COMMAND_TIMEOUT_S:g} s") from None
    if check and done.returncode != 0:
        raise FabricError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done


def _ip(ns: str, *args: str) -> None:
    _run(["ip", "-n", ns, *args])


def probe_namespaces(tag: str, run: Callable[[list[str]], subprocess.CompletedProcess] | None = None) -> str | None:
    """Why this process cannot make network namespaces, or None when it can.

    Really tries (`ip netns add`, a veth inside it, delete): being root is not enough in a
    container without CAP_SYS_ADMIN, and CAP_NET_ADMIN alone is not enough either."""
    run = run or (lambda argv: _run(argv, check=False))
    name = f"{tag}-probe"
    try:
        done = run(["ip", "netns", "add", name])
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip().splitlines()[0] if (done.stderr or done.stdout).strip() \
                else f"`ip netns add` exited {done.returncode}"
        done = run(["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        if done.returncode != 0:
            return (done.stderr or "cannot create a veth pair").strip().splitlines()[0]
        return None
    except FabricError as exc:
        return str(exc)
    finally:
        run(["ip", "netns", "del", name])


def list_namespaces(tag: str) -> list[str]:
    """The namespaces this lab made (by name prefix), from /run/netns."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(tag + "-"))
    except OSError:
        return []


def teardown(lab_dir: str | os.PathLike) -> list[str]:
    """Delete every namespace of this lab (a killed lab's too) and its fabric.json; return their names.

    Deleting a namespace deletes its veths and bridges with it."""
    lab_dir = Path(lab_dir)
    found = list_namespaces(lab_tag(lab_dir))
    if found:  # -force: go on past one that fails; what is left is reported by its absence
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in found),
                       capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    (lab_dir / FABRIC_FILE).unlink(missing_ok=True)
    return [ns for ns in found if not (NETNS_DIR / ns).exists()]


def _subnets(cidr: str, rails: int) -> list[ipaddress.IPv4Network]:
    """One equal subnet per rail, and the last one for management."""
    network = ipaddress.IPv4Network(cidr)
    bits = math.ceil(math.log2(rails + 1))
    subnets = list(network.subnets(prefixlen_diff=bits))
    return subnets[:rails] + [subnets[-1]]


def bring_up(lab_dir: str | os.PathLike, node_names: list[str], *, rails: int, link_speed_gbps: float,
             rail_mbit: float, ipam_cidr: str = "10.224.0.0/12",
             say: Callable[[str], None] = print,
             probe: Callable[[str], str | None] = probe_namespaces) -> Fabric | None:
    """Build the fabric for `node_names`, or say why not and return None (the lab uses loopback).

    Whatever this lab left behind before is removed first."""
    lab_dir = Path(lab_dir).resolve()
    if rails < 1:
        raise FabricError(f"a netns fabric needs rails >= 1, got {rails}")
    if not node_names:
        raise FabricError("a fabric needs at least one node")
    tag = lab_tag(lab_dir)
    teardown(lab_dir)
    why = probe(tag)
    if why is not None:
        say(f"aidc lab: cannot create network namespaces ({why}); falling back to loopback")
        return None
    nets = _subnets(ipam_cidr, rails)
    mgmt = nets[-1]
    hosts = [list(itertools.islice(net.hosts(), len(node_names) + 1)) for net in nets]
    if any(len(h) < len(node_names) + 1 for h in hosts):
        raise FabricError(f"ipam_cidr {ipam_cidr} is too small for {len(node_names)} nodes on {rails} rail(s)")
    fabric = Fabric(str(lab_dir), tag, f"{tag}-sw", rails, link_speed_gbps, rail_mbit,
                    store_addr=str(hosts[-1][-1]), prefixlen=nets[0].prefixlen, mgmt_cidr=str(mgmt))
    lab_dir.mkdir(parents=True, exist_ok=True)
    try:
        sw = fabric.switch_ns
        node_ns = {name: f"{tag}-{name}" for name in node_names}
        # One `ip -batch` per namespace and one `tc -batch` (a lab of 5 nodes is ~12 processes,
        # not ~150): this runs on a few shared cores.
        _batch(["ip"], [f"netns add {ns}" for ns in [sw, *node_ns.values()]])
        switch = ["link set lo up"] + [cmd for bridge in [f"br{r}" for r in range(rails)] + ["brm"]
                                       for cmd in (f"link add {bridge} type bridge", f"link set {bridge} up")]
        switch.append(f"addr add {fabric.store_addr}/{mgmt.prefixlen} dev brm")
        nodes: dict[str, list[str]] = {}
        for i, name in enumerate(node_names):
            ns = node_ns[name]
            links = NodeLinks(ns, str(hosts[-1][i]), [], [])
            ports = [(f"n{i}r{r}", f"rail{r}", f"br{r}", str(hosts[r][i]), nets[r].prefixlen) for r in range(rails)]
            ports.append((f"n{i}m", "mgmt0", "brm", links.mgmt_addr, mgmt.prefixlen))
            nodes[ns] = ["link set lo up"]
            for port, ifname, bridge, addr, prefixlen in ports:
                switch += [f"link add {port} type veth peer name {ifname} netns {ns}",
                           f"link set {port} master {bridge}", f"link set {port} up"]
                # IPv4 only (no link-local address): gloo must find one address per rail.
                nodes[ns] += [f"link set {ifname} addrgenmode none", f"addr add {addr}/{prefixlen} dev {ifname}",
                              f"link set {ifname} up"]
                if ifname != "mgmt0":
                    links.rail_addrs.append(addr)
                    links.switch_ports.append(port)
            fabric.nodes[name] = links
        _batch(["ip", "-n", sw], switch)
        for ns, commands in nodes.items():
            _batch(["ip", "-n", ns], commands)
        for ns, commands in _tbf_commands(fabric, {(name, r): 1.0 for name in node_names for r in range(rails)}).items():
            _batch(["tc", "-n", ns], commands)
        _save(fabric)
        for name in node_names:
            write_links(lab_dir / "nodes" / name, {r: {"up": True, "rate_fraction": 1.0, "loss_pct": 0.0}
                                                    for r in range(rails)})
    except BaseException:  # half a fabric is none: nothing may stay behind (Ctrl-C included)
        teardown(lab_dir)
        raise
    say(fabric.describe())
    return fabric


def _save(fabric: Fabric) -> None:
    write_atomic(Path(fabric.lab_dir) / FABRIC_FILE, json.dumps(fabric.to_dict(), indent=1), SHARED_MODE)


def load(lab_dir: str | os.PathLike) -> Fabric | None:
    """The fabric recorded in `lab_dir`, when it is up (its switch namespace exists)."""
    path = Path(lab_dir) / FABRIC_FILE
    try:
        fabric = Fabric.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FabricError(f"{path} is unreadable ({exc}): run `aidc lab down` and bring the lab up again") from None
    return fabric if (NETNS_DIR / fabric.switch_ns).exists() else None


def _batch(argv: list[str], commands: list[str]) -> None:
    """Run `commands` through one `ip -batch -` / `tc -batch -` (stops at the first failure)."""
    try:
        done = subprocess.run([*argv, "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise FabricError(f"{argv[0]} is not installed (`make system-deps` installs iproute2 and nftables)") from None
    except subprocess.TimeoutExpired:
        raise FabricError(f"`{' '.join(argv)} -batch` did not finish in {COMMAND_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        raise FabricError(f"`{' '.join(argv)} -batch` failed: {(done.stderr or done.stdout).strip()[:300]}")


def _tbf_commands(fabric: Fabric, fractions: dict[tuple[str, int], float]) -> dict[str, list[str]]:
    """tc commands, by namespace, shaping both ends of each (node, rail): the node's egress and
    the switch's egress towards it."""
    out: dict[str, list[str]] = {}
    for (node, rail), fraction in fractions.items():
        links = fabric.nodes[node]
        rate = f"{max(fabric.rail_mbit * fraction * 1000, 8):.0f}kbit"  # tbf refuses a zero rate
        for ns, dev in ((links.netns, f"rail{rail}"), (fabric.switch_ns, links.switch_ports[rail])):
            out.setdefault(ns, []).append(f"qdisc replace dev {dev} root tbf rate {rate} burst {TBF_BURST}"
                                          f" latency {TBF_LATENCY}")
    return out


def _shape(fabric: Fabric, node: str, rail: int, fraction: float) -> None:
    for ns, commands in _tbf_commands(fabric, {(node, rail): fraction}).items():
        _batch(["tc", "-n", ns], commands)


def _set_loss(fabric: Fabric, node: str, rail: int, loss_pct: float) -> None:
    """Drop `loss_pct` % of the rail's packets, both directions, with nftables in the node's namespace."""
    ns = fabric.nodes[node].netns
    ifname = f"rail{rail}"
    chains = {"in": "input", "out": "output"}
    script = [f"table inet {NFT_TABLE} {{"]
    for chain, hook in chains.items():
        script.append(f"  chain {chain}_{ifname} {{ type filter hook {hook} priority 0; policy accept;")
        if loss_pct > 0:
            key = "iifname" if chain == "in" else "oifname"
            script.append(f"    {key} \"{ifname}\" numgen random mod 10000 < {round(loss_pct * 100)} drop")
        script.append("  }")
    script.append("}")
    # Recreate this rail's chains (flush-and-fill in one transaction; other rails untouched).
    flush = [f"add table inet {NFT_TABLE}"] + [
        f"add chain inet {NFT_TABLE} {c}_{ifname} {{ type filter hook {h} priority 0; policy accept; }}"
        for c, h in chains.items()] + [f"delete chain inet {NFT_TABLE} {c}_{ifname}" for c in chains]
    text = "\n".join(flush + script) + "\n"
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise FabricError(f"nft in {ns} failed: {done.stderr.strip()[:300]}")


def links_path(node_dir: str | os.PathLike) -> Path:
    return Path(node_dir) / LINKS_FILE


def read_links(node_dir: str | os.PathLike) -> dict[str, dict]:
    try:
        return json.loads(links_path(node_dir).read_text())["rails"]
    except FileNotFoundError:
        return {}


def write_links(node_dir: Path, rails: dict) -> None:
    """`<node_dir>/links.json`: {"rails": {"<R>": {"up", "rate_fraction", "loss_pct"}}}."""
    node_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(links_path(node_dir), json.dumps({"rails": {str(r): state for r, state in rails.items()}}, indent=1),
                 SHARED_MODE)


def inject_link(node_dir: str | os.PathLike, rail: int, *, rate: float | None = None, loss_pct: float | None = None,
                down: bool = False, up: bool = False, clear: bool = False) -> dict:
    """Change one rail of a lab node for real; return the rail's new state (also in links.json).

    `clear` restores the rail (full rate, no loss, up); `up` only brings it up."""
    node_dir = Path(node_dir).resolve()
    lab_dir, node = node_dir.parent.parent, node_dir.name
    chosen = [name for name, on in (("--rate", rate is not None), ("--loss", loss_pct is not None),
                                    ("--down", down), ("--up", up), ("--clear", clear)) if on]
    if len(chosen) != 1:
        raise FabricError("give exactly one of --rate FRACTION, --loss PCT, --down, --up, --clear"
                          + (f" (got {', '.join(chosen)})" if chosen else ""))
    if rate is not None and not 0 < rate <= 1:
        raise FabricError(f"--rate is a fraction of the link rate in (0, 1], not {rate:g}")
    if loss_pct is not None and not 0 <= loss_pct <= 100:
        raise FabricError(f"--loss is a percentage in [0, 100], not {loss_pct:g}")
    fabric = load(lab_dir)
    if fabric is None:
        raise FabricError(f"no netns fabric is up for {lab_dir} (the lab's stack needs fabric.kind: netns, and"
                          " `aidc lab fabric` or a lab run brings it up): a link fault needs a real link")
    if node not in fabric.nodes:
        raise FabricError(f"{node} is not a node of the fabric in {lab_dir} (nodes: {', '.join(fabric.nodes)})")
    if not 0 <= rail < fabric.rails:
        raise FabricError(f"rail {rail} out of range: the fabric has {fabric.rails} rail(s) (0..{fabric.rails - 1})")
    rails = {int(r): s for r, s in read_links(node_dir).items()}
    state = dict(rails.get(rail, {"up": True, "rate_fraction": 1.0, "loss_pct": 0.0}))
    ns, ifname = fabric.nodes[node].netns, f"rail{rail}"
    if rate is not None:
        _shape(fabric, node, rail, rate)
        state["rate_fraction"] = float(rate)
    elif loss_pct is not None:
        _set_loss(fabric, node, rail, loss_pct)
        state["loss_pct"] = float(loss_pct)
    elif down:
        _ip(ns, "link", "set", ifname, "down")
        state["up"] = False
    else:
        _ip(ns, "link", "set", ifname, "up")
        state["up"] = True
        if clear:
            _shape(fabric, node, rail, 1.0)
            _set_loss(fabric, node, rail, 0.0)
            state.update(rate_fraction=1.0, loss_pct=0.0)
    rails[rail] = state
    write_links(node_dir, rails)
    return {"node": node, "rail": rail, "netns": ns, "ifname": ifname, **state}


def link_states(fabric: Fabric) -> dict[str, dict[int, bool]]:
    """Per node, per rail: is the node's rail interface up (operstate) in its namespace."""
    out = {}
    for node, links in fabric.nodes.items():
        done = _run(["ip", "-n", links.netns, "-j", "link", "show"], check=False)
        try:
            shown = {i["ifname"]: i for i in json.loads(done.stdout or "[]")}
        except ValueError:
            shown = {}
        out[node] = {r: "UP" in shown.get(f"rail{r}", {}).get("flags", []) and
                     shown.get(f"rail{r}", {}).get("operstate") != "DOWN" for r in range(fabric.rails)}
    return out


def enter_netns(name: str) -> None:
    """Move the calling thread into a named network namespace (before it makes any socket).

    Python 3.11 has no os.setns: libc's setns through ctypes. Threads started afterwards
    inherit the namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise FabricError(f"cannot enter network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[[], object]) -> object:
    """Run `fn` on a thread inside namespace `name` and return its result: the sockets it
    makes live there, while this thread stays where it is."""
    box: dict = {}

    def target() -> None:
        try:
            enter_netns(name)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns:{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def ensure(spec, lab_dir: str | os.PathLike, say: Callable[[str], None] = print,
           probe: Callable[[str], str | None] = probe_namespaces) -> Fabric | None:
    """The stack's fabric for this lab: None for a loopback stack (or where namespaces cannot be
    made); the one already up when it matches the spec; else a new one."""
    if spec.fabric.kind != "netns":
        return None
    names = [n.name for n in spec.nodes()]
    current = load(lab_dir)
    if (current is not None and sorted(current.nodes) == sorted(names) and current.rails == spec.fabric.rails
            and current.rail_mbit == spec.lab.fabric_rail_mbit and current.spec_link_gbps == spec.fabric.link_speed_gbps):
        say(current.describe())
        return current
    return bring_up(lab_dir, names, rails=spec.fabric.rails, link_speed_gbps=spec.fabric.link_speed_gbps,
                    rail_mbit=spec.lab.fabric_rail_mbit, ipam_cidr=spec.fabric.ipam_cidr, say=say, probe=probe)
