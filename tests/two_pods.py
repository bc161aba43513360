"""The two-pod topology several namespace tests share: a node namespace with pod1 and pod2
on veth pairs, and the node configuration that tracks both."""
from __future__ import annotations

import textwrap
from collections.abc import Iterator

from tuplet.lab.topology import Topology

POD1, POD2 = "10.64.0.36", "10.64.0.64"
POD1_V6, POD2_V6 = "fd00:10:244::24", "fd00:10:244::40"   # with dual_stack
#: [conntrack] of node_config_text for tests that read Packets/Bytes (accounting is off by default).
COUNTING = "tcp_max = 8192\nany_max = 4096\naccounting = true"


def two_pods(dual_stack: bool = False) -> Iterator[Topology]:
    """Yields a Topology with .node, .p1, .p2 (use it as a pytest fixture body); with
    ``dual_stack``, the pods have POD1_V6 and POD2_V6 beside their IPv4 addresses."""
    with Topology() as t:
        node = t.add_node("node")
        t.add_pod(node, "pod1", POD1, ipv6=POD1_V6 if dual_stack else None)
        t.add_pod(node, "pod2", POD2, ipv6=POD2_V6 if dual_stack else None)
        t.node = node
        t.p1, t.p2 = node.pods
        yield t


def node_config_text(topo: Topology, pin_root: str, name: str = "test", mode: str | None = "auto",
                     identities: bool = True, conntrack: str = "tcp_max = 8192\nany_max = 4096") -> str:
    """[node], both pods as [[endpoints]] (with identities 3096 and 4122, and their IPv6
    addresses when they have them) and [conntrack]."""
    ident1 = "identity = 3096" if identities else ""
    ident2 = "identity = 4122" if identities else ""
    v6 = [f'ipv6 = "{p.ipv6}"' if p.ipv6 else "" for p in (topo.p1, topo.p2)]
    attach = f'attach_mode = "{mode}"' if mode else ""
    return textwrap.dedent(f"""
        [node]
        name = "{name}"
        netns = "{topo.node.netns}"
        pin_root = "{pin_root}"
        {attach}

        [[endpoints]]
        name = "pod1"
        ifname = "{topo.p1.host_ifname}"
        ipv4 = "{POD1}"
        {v6[0]}
        {ident1}

        [[endpoints]]
        name = "pod2"
        ifname = "{topo.p2.host_ifname}"
        ipv4 = "{POD2}"
        {v6[1]}
        {ident2}

        [lb]
        socket_lb = false   # tests never attach to the root cgroup

        [conntrack]
    """) + textwrap.dedent(conntrack) + "\n"
