"""Throwaway topologies of network namespaces for the demo and the tests.

A node is a network namespace that routes between its pods; a pod is a namespace
joined to its node by a veth pair (``eth0`` inside, ``lxc-<pod>`` on the node,
proxy ARP on the node side, a /32 route to the pod); an external host is a
namespace on a /24 with the node's "NIC". Everything is built with pyroute2 and
removed by :meth:`Topology.close`, which also runs at exit and is idempotent.
"""
from __future__ import annotations

import atexit
import contextlib
import secrets
import subprocess
from dataclasses import dataclass, field
from typing import Any, Iterator

import structlog
from pyroute2 import IPRoute
from pyroute2 import netns as _netns

from .netns import enter, sysctl

log = structlog.get_logger("tuplet.topology")


@contextlib.contextmanager
def rtnl(ns: str) -> Iterator[IPRoute]:
    """An rtnetlink socket inside namespace ns, opened in-process.

    (pyroute2's NetNS forks a helper process per namespace; a socket opened after
    setns() stays bound to that namespace and needs no helper.)
    """
    with enter(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


@dataclass
class Node:
    name: str
    netns: str
    pods: list["Pod"] = field(default_factory=list)


@dataclass
class Pod:
    name: str
    netns: str
    ipv4: str
    host_ifname: str
    ifindex_host: int
    node: Node


@dataclass
class External:
    name: str
    netns: str
    ipv4: str
    node_ip: str
    node_ifname: str
    ifindex_node: int
    node: Node


Host = Node | Pod | External


class Topology:
    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or "tpl-" + secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        atexit.register(self.close)

    # --- building ----------------------------------------------------------------------------

    def _create_ns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        _netns.create(full)
        self.namespaces.append(full)
        with rtnl(full) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        with enter(full):
            sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        log.debug("netns created", netns=full)
        return full

    def add_node(self, name: str = "node") -> Node:
        ns = self._create_ns(name)
        with enter(ns):
            sysctl("net.ipv4.ip_forward", "1")
            sysctl("net.ipv4.conf.all.rp_filter", "0")
            sysctl("net.ipv4.conf.default.rp_filter", "0")
        return Node(name, ns)

    def add_pod(self, node: Node, name: str, ipv4: str, host_ifname: str | None = None) -> Pod:
        ns = self._create_ns(name)
        host_if = host_ifname or f"lxc-{name}"[:15]
        with rtnl(node.netns) as nns:
            nns.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = nns.link_lookup(ifname=host_if)[0]
            nns.link("set", index=idx, state="up")
        with enter(node.netns):
            sysctl(f"net.ipv4.conf.{host_if}.proxy_arp", "1")
            sysctl(f"net.ipv4.conf.{host_if}.rp_filter", "0")
        with rtnl(node.netns) as nns:
            nns.route("add", dst=f"{ipv4}/32", oif=idx)
        with rtnl(ns) as pns:
            pidx = pns.link_lookup(ifname="eth0")[0]
            pns.addr("add", index=pidx, address=ipv4, prefixlen=32)
            pns.link("set", index=pidx, state="up")
            pns.route("add", dst="0.0.0.0/0", oif=pidx, scope=253)  # scope link: ARP via proxy_arp
        pod = Pod(name, ns, ipv4, host_if, idx, node)
        node.pods.append(pod)
        return pod

    def add_external(self, node: Node, name: str, ipv4: str, node_ip: str,
                     node_ifname: str = "eth0", prefixlen: int = 24) -> External:
        ns = self._create_ns(name)
        with rtnl(node.netns) as nns:
            nns.link("add", ifname=node_ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = nns.link_lookup(ifname=node_ifname)[0]
            nns.addr("add", index=idx, address=node_ip, prefixlen=prefixlen)
            nns.link("set", index=idx, state="up")
        with rtnl(ns) as ens:
            eidx = ens.link_lookup(ifname="eth0")[0]
            ens.addr("add", index=eidx, address=ipv4, prefixlen=prefixlen)
            ens.link("set", index=eidx, state="up")
            ens.route("add", dst="0.0.0.0/0", gateway=node_ip)
        return External(name, ns, ipv4, node_ip, node_ifname, idx, node)

    # --- running things inside -------------------------------------------------------------

    def popen(self, host: Host, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], **kw)
        self.procs.append(p)
        return p

    def run(self, host: Host, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("timeout", 30)
        return subprocess.run(["ip", "netns", "exec", host.netns, *argv], **kw)

    # --- cleanup ---------------------------------------------------------------------------

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.procs.clear()
        for ns in reversed(self.namespaces):
            try:
                _netns.remove(ns)
                log.debug("netns removed", netns=ns)
            except OSError:
                pass
        self.namespaces.clear()

    @staticmethod
    def cleanup_stale(prefix: str) -> list[str]:
        """Remove namespaces left behind by an interrupted run with this prefix."""
        gone = []
        for ns in _netns.listnetns():
            if ns.startswith(prefix + "-"):
                _netns.remove(ns)
                gone.append(ns)
        return gone

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
