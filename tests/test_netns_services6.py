"""NodePort and LoadBalancer over IPv6 with real sockets: an external dual-stack host reaches an IPv6
LoadBalancer VIP (TCP, UDP) and an IPv6 NodePort on the node's own address through the node's NIC
programs, to backends on the node; the replies come from the service address. Neighbour discovery
between the host and the node passes the NIC programs untouched (or nothing would resolve)."""
from __future__ import annotations

import textwrap

import pytest

from test_netns_services import tuplet
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


SERVICES6 = f"""
    [[services]]
    name = "lb6"
    type = "LoadBalancer"
    address = "{LB_VIP6}"
    port = 80
    backends = ["[{BACK1_6}]:8000", "[{BACK2_6}]:8000"]

    [[services]]
    name = "lb6-udp"
    type = "LoadBalancer"
    address = "{LB_VIP6}"
    port = 53
    protocol = "udp"
    backends = ["[{BACK1_6}]:8000", "[{BACK2_6}]:8000"]

    [[services]]
    name = "np6"
    type = "NodePort"
    address = "{NODE_IP6}"
    port = {NODE_PORT}
    backends = ["[{BACK2_6}]:8000"]

    [[services]]
    name = "np6-udp"
    type = "NodePort"
    address = "{NODE_IP6}"
    port = {NODE_PORT}
    protocol = "udp"
    backends = ["[{BACK1_6}]:8000"]
"""


@pytest.fixture
def applied(topo, pin_root):
    cfg = config.parse(textwrap.dedent(f"""
        [node]
        name = "svc6-test"
        netns = "{topo.node.netns}"
        pin_root = "{pin_root}"

        [[endpoints]]
        name = "back1"
        ifname = "{topo.b1.host_ifname}"
        ipv4 = "{BACK1}"
        ipv6 = "{BACK1_6}"

        [[endpoints]]
        name = "back2"
        ifname = "{topo.b2.host_ifname}"
        ipv4 = "{BACK2}"
        ipv6 = "{BACK2_6}"

        [[devices]]
        ifname = "eth0"

        [conntrack]
        tcp_max = 8192
        any_max = 4096

        [lb]
        maglev_table_size = 1021
        socket_lb = false   # per packet; tests never attach to the root cgroup
    """) + textwrap.dedent(SERVICES6))
    node_apply.apply(cfg)
    yield cfg
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
