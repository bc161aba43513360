"""Services with real sockets: pods reach a ClusterIP, an external host reaches NodePort and
LoadBalancer addresses, and backend changes leave established connections alone."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from traffic import LiveConnection, ask, start_server
from tuplet.datapath import abi, metrics, paths
from tuplet.lab.topology import Topology
from tuplet.node import apply as node_apply
from tuplet.node import config

pytestmark = pytest.mark.netns

CLIENT, BACK1, BACK2 = "10.64.0.36", "10.64.0.98", "10.64.0.64"
VIP, LB_VIP, NODE_IP, EXT = "10.68.174.146", "172.190.0.17", "172.191.0.254", "172.191.0.1"
NODE_PORT = 30080


@pytest.fixture
def topo():
    with Topology() as t:
        node = t.add_node("node")
        t.client = t.add_pod(node, "client", CLIENT)
        t.b1 = t.add_pod(node, "back1", BACK1)
        t.b2 = t.add_pod(node, "back2", BACK2)
        t.ext = t.add_external(node, "ext", EXT, node_ip=NODE_IP, node_ifname="eth0")
        t.add_service_range(node, "10.68.0.0/16")
        t.run(t.ext, ["ip", "route", "add", f"{LB_VIP}/32", "via", NODE_IP], check=True)
        t.node = node
        for pod, name in ((t.b1, "back1"), (t.b2, "back2")):
            start_server(t, pod, 8000, name)
        yield t


def endpoint_toml(pod) -> str:
    """A pod of the topology as an [[endpoints]] table (the client with identity 3096)."""
    v6 = f'ipv6 = "{pod.ipv6}"\n' if pod.ipv6 else ""
    ident = "identity = 3096\n" if pod.name == "client" else ""
    return (f'[[endpoints]]\nname = "{pod.name}"\nifname = "{pod.host_ifname}"\nipv4 = "{pod.ipv4}"\n'
            f"{v6}{ident}\n")


def node_config(topo, pin_root: str, services: str) -> str:
    """The node with every pod of the topology an endpoint, eth0 its device, and services."""
    return textwrap.dedent(f"""
        [node]
        name = "svc-test"
        netns = "{topo.node.netns}"
        pin_root = "{pin_root}"

        [[devices]]
        ifname = "eth0"

        [conntrack]
        tcp_max = 8192
        any_max = 4096

        [lb]
        maglev_table_size = 1021
        socket_lb = false   # per packet; tests never attach to the root cgroup
    """) + "".join(endpoint_toml(p) for p in topo.node.pods) + textwrap.dedent(services)


def services_toml(*services: tuple[str, str, str, int, str, list[str]]) -> str:
    """[[services]] tables from (name, type, address, port, protocol, backends)."""
    return "".join(f'[[services]]\nname = "{n}"\ntype = "{t}"\naddress = "{a}"\nport = {p}\nprotocol = "{proto}"\n'
                   f"backends = {json.dumps(b)}\n\n" for n, t, a, p, proto, b in services)


SERVICES = services_toml(
    ("web", "ClusterIP", VIP, 80, "tcp", [f"{BACK1}:8000", f"{BACK2}:8000"]),
    ("dns", "ClusterIP", VIP, 53, "udp", [f"{BACK1}:8000", f"{BACK2}:8000"]),
    ("lb", "LoadBalancer", LB_VIP, 80, "tcp", [f"{BACK1}:8000", f"{BACK2}:8000"]),
    ("np", "NodePort", NODE_IP, NODE_PORT, "udp", [f"{BACK2}:8000"]),
)


@pytest.fixture
def applied(topo, pin_root):
    done = []

    def apply(services: str = SERVICES) -> config.NodeConfig:
        cfg = config.parse(node_config(topo, pin_root, services))
        node_apply.apply(cfg)
        done.append(cfg)
        return cfg

    yield apply
    if done:
        node_apply.teardown(pin_root)


def tuplet(pin_root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, *args],
                          capture_output=True, text=True, timeout=60)


def drops(pin_root: str) -> dict[str, int]:
    obj = str(paths.object_dir() / abi.OBJ_LXC)
    with paths.open_pinned(pin_root, abi.METRICS_MAP) as m:
        return {c.reason: c.packets for c in metrics.read(m, metrics.reason_names(obj), metrics.direction_names(obj))
                if c.dropped}


def test_pod_reaches_clusterip_over_tcp_and_udp(topo, applied) -> None:
    applied()
    answers = ask(topo, topo.client, "tcp", VIP, 80, n=16)
    assert {peer for _, peer in answers} == {f"{VIP}:80"}        # replies come from the VIP
    assert Counter(name for name, _ in answers).keys() == {"back1", "back2"}
    answers = ask(topo, topo.client, "udp", VIP, 53, n=12)
    assert {peer for _, peer in answers} == {f"{VIP}:53"}
    assert Counter(name for name, _ in answers).keys() == {"back1", "back2"}


def test_external_client_reaches_loadbalancer_and_nodeport(topo, applied) -> None:
    applied()
    answers = ask(topo, topo.ext, "tcp", LB_VIP, 80, n=12)
    assert {peer for _, peer in answers} == {f"{LB_VIP}:80"}
    assert {name for name, _ in answers} <= {"back1", "back2"} and "error" not in dict(answers)
    answers = ask(topo, topo.ext, "udp", NODE_IP, NODE_PORT, n=4)
    assert answers == [("back2", f"{NODE_IP}:{NODE_PORT}")] * 4
    # A ClusterIP is not reachable from outside the node.
    assert ask(topo, topo.ext, "tcp", VIP, 80)[0][0] == "error"


def test_backend_changes_keep_established_connections(topo, applied, pin_root) -> None:
    applied()
    conns = [LiveConnection(topo, topo.client, VIP, 80) for _ in range(8)]
    owner = [c.roundtrip("hello").split()[0] for c in conns]
    assert set(owner) == {"back1", "back2"}
    # Remove back2 from every service: all connections go on, new ones only reach back1.
    only1 = SERVICES.replace(f'backends = ["{BACK1}:8000", "{BACK2}:8000"]', f'backends = ["{BACK1}:8000"]')
    assert only1 != SERVICES
    applied(only1)
    # Every established connection goes on, back2's included: back2 drains.
    for c, o in zip(conns, owner):
        assert c.roundtrip("again") == f"{o} again"
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=8)} == {"back1"}
    listing = tuplet(pin_root, "svc", "list")
    assert f"draining backends (removed, still used by established flows): {BACK2}:8000/tcp" in listing.stdout
    # Add it back: established connections stay where they are.
    applied()
    for c, o in zip(conns, owner):
        assert c.roundtrip("still") == f"{o} still"
        c.close()
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=16)} == {"back1", "back2"}


def test_remote_nodeport_backend_is_a_counted_drop(topo, applied, pin_root) -> None:
    applied(SERVICES + f"""
    [[services]]
    name = "remote"
    type = "LoadBalancer"
    address = "{LB_VIP}"
    port = 443
    backends = [{{ address = "10.65.0.9", port = 8443, node = "192.168.7.2" }}]
""")
    assert ask(topo, topo.ext, "tcp", LB_VIP, 443)[0][0] == "error"
    assert drops(pin_root).get("DROP_REMOTE_BACKEND", 0) >= 1


def test_svc_cli_add_list_update_delete(topo, applied, pin_root) -> None:
    applied("")
    r = tuplet(pin_root, "svc", "add", "web", "--type", "ClusterIP", "--address", VIP, "--port", "80",
               "--backend", f"{BACK1}:8000", "--backend", f"{BACK2}:8000")
    assert r.returncode == 0, r.stderr
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=12)} == {"back1", "back2"}
    r = tuplet(pin_root, "svc", "list")
    assert r.returncode == 0 and "web" in r.stdout and BACK1 in r.stdout and "%" in r.stdout
    bad = tuplet(pin_root, "svc", "update", "web", "--backend", "10.64.0.300:8000")
    assert bad.returncode == 2 and "10.64.0.300" in bad.stderr
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=12)} == {"back1", "back2"}
    r = tuplet(pin_root, "svc", "update", "web", "--backend", f"{BACK2}:8000")
    assert r.returncode == 0, r.stderr
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=6)} == {"back2"}
    r = tuplet(pin_root, "svc", "delete", "web")
    assert r.returncode == 0, r.stderr
    assert ask(topo, topo.client, "tcp", VIP, 80)[0][0] == "error"
    assert tuplet(pin_root, "svc", "delete", "web").returncode == 1
