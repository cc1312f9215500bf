"""The lab's netns fabric: real namespaces, veths, bridges, tc and nftables (root only)."""

import json
import os
import subprocess

import pytest

from aidc.lab import fabric
from aidc.spec import load_stack, parse_spec


def ip_json(*args: str) -> list[dict]:
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout or "[]")


def tbf_rate_bits(ns: str, dev: str) -> int:
    qdiscs = json.loads(subprocess.run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev], capture_output=True,
                                       text=True, check=True).stdout)
    (tbf,) = [q for q in qdiscs if q["kind"] == "tbf"]
    return tbf["options"]["rate"] * 8  # tc -j reports bytes per second


@pytest.fixture
def netns_ok():
    why = fabric.probe_namespaces("aidctestprobe")
    if why is not None:
        pytest.skip(f"network namespaces cannot be made here: {why}")


def three_node_fabric(lab_dir):
    """A 3-node, 2-rail fabric in a fresh lab directory; removed afterwards whatever happens."""
    built = fabric.bring_up(lab_dir, ["gpu-0", "gpu-1", "gpu-2"], rails=2, link_speed_gbps=10, rail_mbit=100,
                            say=lambda _: None)
    yield built
    fabric.teardown(lab_dir)
    assert fabric.list_namespaces(built.tag) == []


@pytest.fixture
def lab(tmp_path, netns_ok):
    yield from three_node_fabric(tmp_path / "lab")


@pytest.fixture(scope="module")
def untouched_lab(tmp_path_factory):
    """One fabric for the tests that must leave it as it was."""
    why = fabric.probe_namespaces("aidctestprobe")
    if why is not None:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    yield from three_node_fabric(tmp_path_factory.mktemp("fabric") / "lab")


def test_each_node_gets_a_namespace_with_one_shaped_veth_per_rail_into_that_rails_bridge(untouched_lab):
    lab = untouched_lab
    root_links_before = {link["ifname"] for link in ip_json("link", "show")}
    assert fabric.list_namespaces(lab.tag) == sorted([lab.switch_ns] + [f"{lab.tag}-gpu-{i}" for i in range(3)])
    bridged = {link["ifname"]: link.get("master") for link in ip_json("-n", lab.switch_ns, "link", "show")}
    for i, node in enumerate(["gpu-0", "gpu-1", "gpu-2"]):
        links = lab.nodes[node]
        addrs = {a["ifname"]: [x["local"] for x in a["addr_info"]] for a in ip_json("-n", links.netns, "addr", "show")}
        assert addrs["rail0"] == [f"10.224.0.{i + 1}"] and addrs["rail1"] == [f"10.228.0.{i + 1}"]
        assert addrs["mgmt0"] == [links.mgmt_addr]  # IPv4 only: gloo finds one address per rail
        for r in range(2):
            assert bridged[f"n{i}r{r}"] == f"br{r}"
            # Shaped both ways: what the node sends and what the switch sends to it.
            assert tbf_rate_bits(links.netns, f"rail{r}") == 100_000_000
            assert tbf_rate_bits(lab.switch_ns, f"n{i}r{r}") == 100_000_000
        assert fabric.read_links(lab.lab_dir + f"/nodes/{node}") == {
            "0": {"up": True, "rate_fraction": 1.0, "loss_pct": 0.0}, "1": {"up": True, "rate_fraction": 1.0,
                                                                          "loss_pct": 0.0}}
    recorded = json.loads((fabric.Path(lab.lab_dir) / "fabric.json").read_text())
    assert recorded["scale"] == pytest.approx(0.01) and recorded["link_rate_gbps"] == pytest.approx(0.1)
    assert lab.describe().endswith("shaped to 100 Mbit/s each = spec 10 Gb/s x scale 0.01")
    assert {link["ifname"] for link in ip_json("link", "show")} == root_links_before


def udp_delivery(lab, sender: str, receiver: str, rail: int, count: int = 2000) -> float:
    """The fraction of `count` small UDP datagrams from one node to another's rail address that arrive."""
    import socket

    def bind():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((lab.nodes[receiver].rail_addrs[rail], 0))
        sock.settimeout(0.5)
        return sock

    def send(port: int):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(count):
                try:
                    sock.sendto(i.to_bytes(4, "big") * 16, (lab.nodes[receiver].rail_addrs[rail], port))
                except OSError:  # no route: the rail is down
                    return

    rx = fabric.in_netns(lab.nodes[receiver].netns, bind)
    with rx:
        fabric.in_netns(lab.nodes[sender].netns, lambda: send(rx.getsockname()[1]))
        received = 0
        try:
            while received < count:
                rx.recv(64)
                received += 1
        except TimeoutError:
            pass
    return received / count


def test_link_faults_change_the_real_link_and_are_written_to_links_json(lab, aidc_cli):
    node_dir = f"{lab.lab_dir}/nodes/gpu-1"
    ns = lab.nodes["gpu-1"].netns

    out = aidc_cli("device", "inject", node_dir, "link", "--rail", "1", "--rate", "0.3", "--json")
    assert out.returncode == 0, out.stderr
    assert tbf_rate_bits(ns, "rail1") == 30_000_000 and tbf_rate_bits(lab.switch_ns, "n1r1") == 30_000_000
    assert tbf_rate_bits(ns, "rail0") == 100_000_000  # the other rail untouched

    fabric.inject_link(node_dir, 1, loss_pct=20)
    rules = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "aidc_fault"],
                           capture_output=True, text=True, check=True).stdout
    assert 'oifname "rail1" numgen random mod 10000 < 2000 drop' in rules
    assert 'iifname "rail1" numgen random mod 10000 < 2000 drop' in rules
    # Really dropped: of 2000 datagrams from gpu-0 over rail 1, about 80% arrive (binomial:
    # 0.7-0.9 is more than five standard deviations either side); over rail 0 all of them.
    assert 0.7 < udp_delivery(lab, "gpu-0", "gpu-1", rail=1) < 0.9
    assert udp_delivery(lab, "gpu-0", "gpu-1", rail=0) == 1.0

    fabric.inject_link(node_dir, 0, down=True)
    assert fabric.link_states(lab)["gpu-1"] == {0: False, 1: True}
    assert fabric.link_states(lab)["gpu-0"] == {0: True, 1: True}
    assert fabric.read_links(node_dir) == {"0": {"up": False, "rate_fraction": 1.0, "loss_pct": 0.0},
                                           "1": {"up": True, "rate_fraction": 0.3, "loss_pct": 20.0}}
    assert udp_delivery(lab, "gpu-0", "gpu-1", rail=0) == 0.0

    assert aidc_cli("device", "inject", node_dir, "link", "--rail", "0", "--up").returncode == 0
    assert fabric.link_states(lab)["gpu-1"] == {0: True, 1: True}
    assert fabric.read_links(node_dir)["1"]["rate_fraction"] == 0.3  # --up changes nothing else
    fabric.inject_link(node_dir, 1, clear=True)
    assert fabric.link_states(lab)["gpu-1"] == {0: True, 1: True}
    assert tbf_rate_bits(ns, "rail1") == 100_000_000
    rules = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "aidc_fault"],
                           capture_output=True, text=True, check=True).stdout
    assert "drop" not in rules
    assert all(state == {"up": True, "rate_fraction": 1.0, "loss_pct": 0.0}
               for state in fabric.read_links(node_dir).values())


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 1.5}, "--rate is a fraction of the link rate in (0, 1], not 1.5"),
    ({"rate": 0.0}, "--rate is a fraction of the link rate in (0, 1], not 0"),
    ({"loss_pct": 200.0}, "--loss is a percentage in [0, 100], not 200"),
    ({}, "give exactly one of --rate FRACTION, --loss PCT, --down, --up, --clear"),
    ({"rate": 0.5, "down": True}, "(got --rate, --down)"),
    ({"rail": 7, "down": True}, "rail 7 out of range: the fabric has 2 rail(s) (0..1)"),
])
def test_bad_link_fault_arguments_are_refused_and_change_nothing(untouched_lab, kwargs, message):
    node_dir = f"{untouched_lab.lab_dir}/nodes/gpu-0"
    with pytest.raises(fabric.FabricError) as refused:
        fabric.inject_link(node_dir, **{"rail": 0, **kwargs})
    assert message in str(refused.value)
    assert fabric.read_links(node_dir)["0"] == {"up": True, "rate_fraction": 1.0, "loss_pct": 0.0}
    assert fabric.link_states(untouched_lab)["gpu-0"] == {0: True, 1: True}


def test_a_bad_link_fault_on_the_command_line_is_one_error_line(untouched_lab, aidc_cli):
    out = aidc_cli("device", "inject", f"{untouched_lab.lab_dir}/nodes/gpu-0", "link", "--rail", "0", "--rate", "1.5")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr == "aidc: error: --rate is a fraction of the link rate in (0, 1], not 1.5\n"


def test_a_link_fault_on_a_lab_without_a_fabric_is_refused_not_pretended(tmp_path, aidc_cli):
    node_dir = tmp_path / "lab" / "nodes" / "gpu-0"
    node_dir.mkdir(parents=True)
    out = aidc_cli("device", "inject", str(node_dir), "link", "--rail", "0", "--rate", "0.5")
    assert out.returncode != 0 and "no netns fabric is up" in out.stderr and "Traceback" not in out.stderr
    assert not (node_dir / "links.json").exists()


def test_lab_down_removes_the_namespaces_a_killed_lab_left_behind(tmp_path, netns_ok, aidc_cli):
    lab_dir, other_dir = tmp_path / "lab", tmp_path / "other"
    # A lab whose process was killed: its namespaces remain, and it never wrote lab.json.
    made = aidc_cli("lab", "fabric", "--lab-dir", str(lab_dir), "--json")
    assert made.returncode == 0, made.stderr
    other = fabric.bring_up(other_dir, ["gpu-0"], rails=1, link_speed_gbps=10, rail_mbit=100, say=lambda _: None)
    try:
        tag = fabric.lab_tag(lab_dir)
        assert tag != other.tag  # two labs never share a name
        assert len(fabric.list_namespaces(tag)) == 1 + len(load_stack("lab").nodes())
        (lab_dir / "fabric.json").unlink()  # killed before (or while) it recorded what it made

        out = aidc_cli("lab", "down", "--lab-dir", str(lab_dir), "--json")
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["namespaces_removed"]) == 1 + len(load_stack("lab").nodes())
        assert fabric.list_namespaces(tag) == []
        assert fabric.list_namespaces(other.tag) == [f"{other.tag}-gpu-0", other.switch_ns]  # not another lab's
    finally:
        fabric.teardown(other_dir)
        fabric.teardown(lab_dir)


def test_a_new_fabric_first_removes_what_the_last_one_left(tmp_path, netns_ok):
    lab_dir = tmp_path / "lab"
    first = fabric.bring_up(lab_dir, ["a", "b", "c"], rails=1, link_speed_gbps=10, rail_mbit=100, say=lambda _: None)
    try:
        second = fabric.bring_up(lab_dir, ["a"], rails=1, link_speed_gbps=10, rail_mbit=100, say=lambda _: None)
        assert fabric.list_namespaces(first.tag) == [f"{second.tag}-a", second.switch_ns]
    finally:
        fabric.teardown(lab_dir)


def unprivileged(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a command as nobody, with no capabilities: what `aidc lab` sees when not root."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", *argv],
                          capture_output=True, text=True, timeout=10)


def test_without_the_right_to_make_namespaces_the_lab_says_so_once_and_uses_loopback(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    said = []
    spec = load_stack("lab")
    assert spec.fabric.kind == "netns"
    built = fabric.ensure(spec, tmp_path / "lab", say=said.append,
                          probe=lambda tag: fabric.probe_namespaces(tag, run=unprivileged))
    assert built is None
    assert len(said) == 1 and said[0].startswith("aidc lab: cannot create network namespaces (")
    assert said[0].endswith("); falling back to loopback")
    assert fabric.list_namespaces(fabric.lab_tag(tmp_path / "lab")) == []
    assert not (tmp_path / "lab" / "fabric.json").exists()


def test_a_netns_fabric_needs_at_least_one_rail():
    from aidc.errors import SpecError

    with pytest.raises(SpecError, match="a netns fabric needs rails >= 1"):
        parse_spec({"name": "x", "node_pools": [{"name": "n", "count": 1, "gpu_model": "SIM", "gpus_per_node": 1}],
                    "fabric": {"kind": "netns", "rails": 0}})
