"""NodePort and LoadBalancer over IPv6 with real sockets: an external dual-stack host reaches an IPv6
LoadBalancer VIP (TCP, UDP) and an IPv6 NodePort on the node's own address through the node's NIC
programs, to backends on the node; the replies come from the service address. Neighbour discovery
between the host and the node passes the NIC programs untouched (or nothing would resolve)."""
from __future__ import annotations

import pytest

from test_netns_services import node_config, services_toml, tuplet
from traffic import ask, start_server
from tuplet.conntrack import records as ct
from tuplet.datapath import abi, paths
from tuplet.lab.topology import Topology
from tuplet.node import apply as node_apply
from tuplet.node import config

pytestmark = pytest.mark.netns

BACK1, BACK2 = "10.64.0.98", "10.64.0.64"
BACK1_6, BACK2_6 = "fd00:10:64::62", "fd00:10:64::40"
EXT, NODE_IP = "172.191.0.1", "172.191.0.254"
EXT6, NODE_IP6 = "2001:db8:191::1", "2001:db8:191::fe"
LB_VIP6 = "2001:db8:190::17"
NODE_PORT = 30080


@pytest.fixture
def topo():
    with Topology() as t:
        node = t.add_node("node")
        t.b1 = t.add_pod(node, "back1", BACK1, ipv6=BACK1_6)
        t.b2 = t.add_pod(node, "back2", BACK2, ipv6=BACK2_6)
        t.ext = t.add_external(node, "ext", EXT, node_ip=NODE_IP, node_ifname="eth0", ipv6=EXT6,
                               node_ipv6=NODE_IP6)
        t.run(t.ext, ["ip", "-6", "route", "add", f"{LB_VIP6}/128", "via", NODE_IP6], check=True)
        t.node = node
        for pod, name in ((t.b1, "back1"), (t.b2, "back2")):
            start_server(t, pod, 8000, name, family6=True)
        yield t


BOTH6 = [f"[{BACK1_6}]:8000", f"[{BACK2_6}]:8000"]
SERVICES6 = services_toml(
    ("lb6", "LoadBalancer", LB_VIP6, 80, "tcp", BOTH6),
    ("lb6-udp", "LoadBalancer", LB_VIP6, 53, "udp", BOTH6),
    ("np6", "NodePort", NODE_IP6, NODE_PORT, "tcp", [f"[{BACK2_6}]:8000"]),
    ("np6-udp", "NodePort", NODE_IP6, NODE_PORT, "udp", [f"[{BACK1_6}]:8000"]),
)


@pytest.fixture
def applied(topo, pin_root):
    node_apply.apply(config.parse(node_config(topo, pin_root, SERVICES6)))
    yield
    node_apply.teardown(pin_root)


def nodeport_entries(pin_root: str) -> list[ct.CtRecord]:
    out = []
    for name in abi.CT6_MAPS:
        with paths.open_pinned(pin_root, name) as m:
            out += [r for r in ct.records(m) if r.entry.node_port]
    return out


def test_external_client_reaches_ipv6_loadbalancer_and_nodeport(topo, applied, pin_root) -> None:
    answers = ask(topo, topo.ext, "tcp", LB_VIP6, 80, n=12)
    assert {peer for _, peer in answers} == {f"{LB_VIP6}:80"}, answers        # replies from the VIP
    assert {name for name, _ in answers} <= {"back1", "back2"} and "error" not in dict(answers)
    answers = ask(topo, topo.ext, "udp", LB_VIP6, 53, n=8)
    assert {peer for _, peer in answers} == {f"{LB_VIP6}:53"}, answers
    assert {name for name, _ in answers} <= {"back1", "back2"}
    assert ask(topo, topo.ext, "tcp", NODE_IP6, NODE_PORT, n=4) == [("back2", f"{NODE_IP6}:{NODE_PORT}")] * 4
    assert ask(topo, topo.ext, "udp", NODE_IP6, NODE_PORT, n=4) == [("back1", f"{NODE_IP6}:{NODE_PORT}")] * 4
    # The NodePort CT_EGRESS entries (client -> backend, NodePort flag) are in the IPv6 tables.
    recs = nodeport_entries(pin_root)
    assert {(r.proto, r.src[0]) for r in recs} == {("TCP", EXT6), ("UDP", EXT6)}, [r.line() for r in recs]
    assert all(r.dst[0] in (BACK1_6, BACK2_6) and "NodePort" in r.entry.flag_names for r in recs)
    # IPv4 through the same programs still passes (no IPv4 service here: straight to the node).
    assert ask(topo, topo.ext, "tcp", BACK1, 8000) == [("back1", f"{BACK1}:8000")]
    r = tuplet(pin_root, "svc", "list")
    assert r.returncode == 0 and f"[{LB_VIP6}]:80" in r.stdout, r.stdout
