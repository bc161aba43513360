"""The two-pod topology several namespace tests share: a node namespace with pod1 and pod2
on veth pairs, and the node configuration that tracks both."""
from __future__ import annotations

import textwrap
from collections.abc import Iterator

from tuplet.lab.topology import Topology

POD1, POD2 = "10.64.0.36", "10.64.0.64"
#: [conntrack] of node_config_text for tests that read Packets/Bytes (accounting is off by default).
COUNTING = "tcp_max = 8192\nany_max = 4096\naccounting = true"


def two_pods() -> Iterator[Topology]:
    """Yields a Topology with .node, .p1, .p2 (use it as a pytest fixture body)."""
    with Topology() as t:
        node = t.add_node("node")
        t.add_pod(node, "pod1", POD1)
        t.add_pod(node, "pod2", POD2)
        t.node = node
        t.p1, t.p2 = node.pods
        yield t


def node_config_text(topo: Topology, pin_root: str, name: str = "test", mode: str | None = "auto",
                     identities: bool = True, conntrack: str = "tcp_max = 8192\nany_max = 4096") -> str:
    """[node], both pods as [[endpoints]] (with identities 3096 and 4122) and [conntrack]."""
    ident1 = "identity = 3096" if identities else ""
    ident2 = "identity = 4122" if identities else ""
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
        {ident1}

        [[endpoints]]
        name = "pod2"
        ifname = "{topo.p2.host_ifname}"
        ipv4 = "{POD2}"
        {ident2}

        [conntrack]
    """) + textwrap.dedent(conntrack) + "\n"
