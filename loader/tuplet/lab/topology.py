"""Throwaway topologies of network namespaces for the demo and the tests.

A *node* is a network namespace that routes between its pods. A *pod* is a
namespace joined to its node by a veth pair: ``eth0`` inside with a /32 and a
default route ``dev eth0 scope link`` (so the pod ARPs for every destination),
``lxc-<pod>`` on the node with proxy ARP (so the node answers those ARPs) and a
/32 route to the pod. An *external* host sits on a /24 with the node's "NIC".
IPv6 is disabled in every namespace, so the only traffic is what a test sends
(plus ARP).

Dual stack is opt-in per host: a pod given ``ipv6=`` (e.g. in fd00:10:244::/64) gets
it as a /128 on ``eth0`` with a default route via ``fe80::1``, the link-local address
of the node's side of every pod veth, and the node a /128 route to the pod; an external
host given ``ipv6=`` and ``node_ipv6=`` shares a /``prefixlen6`` with the node's link.
IPv6 is enabled only on those veths, without duplicate address detection (addresses
are usable at once); neighbour discovery then runs on them as on a real node.

Everything is built in-process with pyroute2 (no ``ip`` commands for
configuration) and removed by :meth:`Topology.close`, which is idempotent and
also runs at interpreter exit and on SIGTERM (when nobody else handles SIGTERM).
Processes started with :meth:`Topology.popen` are killed on close.

    with Topology(prefix="tpl-demo") as topo:
        node = topo.add_node("node")
        p1 = topo.add_pod(node, "pod1", "10.64.0.36")
        p2 = topo.add_pod(node, "pod2", "10.64.0.64")
        topo.run(p1, ["ping", "-c1", p2.ipv4], check=True)
"""
from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2 import netns as _netns

from tuplet.node import netns as nsmod
from tuplet.node.netns import NetnsError, enter, sysctl

log = structlog.get_logger("tuplet.topology")

IFNAMSIZ = 15  # usable characters of an interface name
RT_SCOPE_LINK = 253
#: The node's link-local address on every pod veth: the pods' IPv6 default gateway.
GATEWAY6 = "fe80::1"
_KILL_TIMEOUT = 5.0
_LINK_UP_TIMEOUT = 5.0


@contextlib.contextmanager
def rtnl(ns: str) -> Iterator[IPRoute]:
    """An rtnetlink socket (pyroute2 ``IPRoute``) inside namespace ``ns``.

    The socket is opened in-process while the thread is in ``ns`` and stays bound
    to it afterwards (no helper process). pyroute2 0.9 opens one socket per
    *thread*, in that thread's current namespace: use the object only from the
    thread that created it.
    """
    with enter(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _wait_oper_up(ns: str, ifindex: int, timeout: float = _LINK_UP_TIMEOUT) -> None:
    """Wait until the kernel reports the link operationally up.

    Carrier changes go through the kernel's linkwatch, which may delay them up to
    a second; until then the device has no qdisc and drops what is sent (the first
    ARP of a test would be lost and retried a second later).
    """
    deadline = time.monotonic() + timeout
    with rtnl(ns) as ipr:
        while True:
            (link,) = ipr.link("get", index=ifindex)
            state = link.get("IFLA_OPERSTATE")
            if state == "UP":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"link {link.get('IFLA_IFNAME')} in {ns} still {state} after {timeout}s")
            time.sleep(0.01)


# --- the hosts ------------------------------------------------------------------------------


@dataclass
class Node:
    """A namespace that routes between its pods (and to its external hosts)."""

    name: str
    netns: str
    pods: list[Pod] = field(default_factory=list, repr=False)
    externals: list[External] = field(default_factory=list, repr=False)


@dataclass
class Pod:
    """A namespace on a veth pair to its node; ``ifindex_host`` is the node side."""

    name: str
    netns: str
    ipv4: str
    ifname: str          # pod side, in the pod's namespace ("eth0")
    ifindex: int
    mac: str
    host_ifname: str     # node side, in the node's namespace ("lxc-<pod>")
    ifindex_host: int
    host_mac: str
    node: Node = field(repr=False)
    ipv6: str | None = None


@dataclass
class External:
    """A host outside the node, on a /``prefixlen`` with the node's ``node_ifname``."""

    name: str
    netns: str
    ipv4: str
    prefixlen: int
    ifname: str          # its own side ("eth0")
    ifindex: int
    node_ip: str         # the node's address on the link, and this host's default gateway
    node_ifname: str     # node side, in the node's namespace
    ifindex_node: int
    node: Node = field(repr=False)
    ipv6: str | None = None
    node_ipv6: str | None = None
    prefixlen6: int = 64


Host = Node | Pod | External


def _ns_of(host: Host | str) -> str:
    return host if isinstance(host, str) else host.netns


def _ipv6_address(addr: str, what: str) -> str:
    """``addr`` as a unicast, non-link-local IPv6 address, or a ValueError naming ``what``."""
    try:
        ip = ipaddress.IPv6Address(addr)
    except ValueError:
        raise ValueError(f"{what}: not an IPv6 address: {addr!r}") from None
    if ip.is_multicast or ip.is_link_local or ip.is_unspecified or ip.is_loopback:
        raise ValueError(f"{what}: {ip} is not a unicast address a host can own")
    return str(ip)


def _enable_ipv6(ns: str, ifname: str) -> None:
    """IPv6 on one interface of ``ns`` (disabled by default in a topology), without DAD:
    its addresses, link-local included, are usable as soon as the link is up."""
    with enter(ns):
        sysctl(f"net.ipv6.conf.{ifname}.accept_dad", 0)
        sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", 0)


# --- process-wide cleanup: atexit and SIGTERM ----------------------------------------------

_live: set[Topology] = set()
_live_lock = threading.RLock()
_sigterm_installed = False
_main_pid = os.getpid()


def _close_all() -> None:
    with _live_lock:
        topos = list(_live)
    for t in topos:
        t.close()


def _on_sigterm(signum: int, frame: object) -> None:
    # Clean up, then die of SIGTERM exactly as without this handler.
    if os.getpid() == _main_pid:
        try:
            _close_all()
        finally:
            signal.signal(signum, signal.SIG_DFL)
    else:  # a forked child inherited the handler: do not touch the parent's namespaces
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_sigterm() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # never replace somebody else's
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


def _uninstall_sigterm() -> None:
    global _sigterm_installed
    if not _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm_installed = False


atexit.register(_close_all)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up, so Ctrl-C cannot leave half a topology."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _kill_namespace_processes(ns: str, pids: Sequence[int]) -> None:
    me = os.getpid()
    for pid in pids:
        if pid == me:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.warning("killed process left in netns", netns=ns, pid=pid)


def _remove_ns(ns: str, pids: dict[str, list[int]] | None = None) -> bool:
    """Kill what still runs in ``ns`` and remove its name; False when it was gone already."""
    if pids and ns in pids:
        _kill_namespace_processes(ns, pids[ns])
    try:
        _netns.remove(ns)
    except FileNotFoundError:
        return False
    return True


# --- the topology ---------------------------------------------------------------------------


class Topology:
    """Namespaces, veth pairs and processes that all go away on :meth:`close`."""

    def __init__(self, prefix: str | None = None, *, handle_sigterm: bool = True) -> None:
        self.prefix = prefix or "tpl-" + secrets.token_hex(3)
        if not nsmod._valid_name(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} cannot be part of a namespace name")
        self.nodes: list[Node] = []
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.RLock()
        self._closed = False
        self._pid = os.getpid()
        with _live_lock:
            _live.add(self)
            if handle_sigterm:
                _install_sigterm()

    @property
    def namespaces(self) -> list[str]:
        """Names of the namespaces this topology created and has not removed yet."""
        return list(self._namespaces)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- building ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"topology {self.prefix} is closed")

    def _create_ns(self, name: str) -> str:
        self._check_open()
        full = f"{self.prefix}-{name}"
        if not nsmod._valid_name(full):
            raise ValueError(f"{full!r} is not a valid namespace name")
        if os.path.lexists(nsmod.path(full)):
            raise NetnsError(full, f"already exists (a leftover? Topology.cleanup_stale({self.prefix!r}))")
        with self._lock:
            _netns.create(full)
            self._namespaces.append(full)
        log.info("netns created", netns=full, topology=self.prefix)
        with enter(full):
            # Before any veth exists, so every device created later inherits "default".
            for conf in ("all", "default"):
                sysctl(f"net.ipv6.conf.{conf}.disable_ipv6", 1)
        with rtnl(full) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return full

    def add_node(self, name: str = "node") -> Node:
        """A namespace ``<prefix>-<name>`` that forwards IPv4 (and IPv6 between the interfaces that
        have it), without reverse-path filtering."""
        ns = self._create_ns(name)
        with enter(ns):
            sysctl("net.ipv4.ip_forward", 1)
            sysctl("net.ipv6.conf.all.forwarding", 1)
            for conf in ("all", "default", "lo"):
                sysctl(f"net.ipv4.conf.{conf}.rp_filter", 0)
        node = Node(name=name, netns=ns)
        self.nodes.append(node)
        return node

    def _veth(self, node: Node, node_ifname: str, peer_ns: str, peer_ifname: str) -> tuple[int, str]:
        """A veth pair: ``node_ifname`` in the node, ``peer_ifname`` created in ``peer_ns``."""
        peer_fd = os.open(nsmod.path(peer_ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with rtnl(node.netns) as ipr:
                ipr.link("add", ifname=node_ifname, kind="veth",
                         peer={"ifname": peer_ifname, "net_ns_fd": peer_fd})
                (link,) = ipr.link("get", ifname=node_ifname)
        finally:
            os.close(peer_fd)
        return link["index"], link.get("address")

    def add_pod(self, node: Node, name: str, ipv4: str, *, ipv6: str | None = None,
                host_ifname: str | None = None, ifname: str = "eth0") -> Pod:
        """A pod namespace ``<prefix>-<name>`` with ``ipv4``/32 on ``ifname``, routed by ``node``;
        with ``ipv6``, dual stack: ``ipv6``/128 beside it, default route via :data:`GATEWAY6`."""
        ip = str(ipaddress.IPv4Address(ipv4))
        ip6 = _ipv6_address(ipv6, f"pod {name}") if ipv6 is not None else None
        host_if = host_ifname or f"lxc-{name}"
        for n in (host_if, ifname):
            if not 0 < len(n) <= IFNAMSIZ or "/" in n or "." in n or " " in n:
                raise ValueError(f"interface name {n!r} is not usable (1-{IFNAMSIZ} characters, "
                                 "no '/', '.', ' '): pass host_ifname=")
        ns = self._create_ns(name)
        idx_host, mac_host = self._veth(node, host_if, ns, ifname)
        with enter(node.netns):
            sysctl(f"net.ipv4.conf.{host_if}.proxy_arp", 1)
            # Answer proxy ARP at once, not after a random delay of up to 0.8 s.
            sysctl(f"net.ipv4.neigh.{host_if}.proxy_delay", 0)
            sysctl(f"net.ipv4.conf.{host_if}.rp_filter", 0)
            sysctl(f"net.ipv6.conf.{host_if}.disable_ipv6", 1)
        with rtnl(node.netns) as ipr:
            ipr.link("set", index=idx_host, state="up")
            ipr.route("add", dst=ip, dst_len=32, oif=idx_host, scope=RT_SCOPE_LINK)
        with enter(ns):
            sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", 1)
        with rtnl(ns) as ipr:
            (link,) = ipr.link("get", ifname=ifname)
            idx = link["index"]
            ipr.addr("add", index=idx, address=ip, prefixlen=32)
            ipr.link("set", index=idx, state="up")
            # scope link: the pod ARPs for every destination and the node's proxy ARP answers
            ipr.route("add", dst="0.0.0.0", dst_len=0, oif=idx, scope=RT_SCOPE_LINK)
        if ip6 is not None:
            _enable_ipv6(node.netns, host_if)
            _enable_ipv6(ns, ifname)
            with rtnl(node.netns) as ipr:
                ipr.addr("add", index=idx_host, address=GATEWAY6, prefixlen=64)
                ipr.route("add", dst=ip6, dst_len=128, oif=idx_host)
            with rtnl(ns) as ipr:
                ipr.addr("add", index=idx, address=ip6, prefixlen=128)
                ipr.route("add", dst="::", dst_len=0, gateway=GATEWAY6, oif=idx)
        _wait_oper_up(ns, idx)
        _wait_oper_up(node.netns, idx_host)
        pod = Pod(name=name, netns=ns, ipv4=ip, ifname=ifname, ifindex=idx, mac=link.get("address"),
                  host_ifname=host_if, ifindex_host=idx_host, host_mac=mac_host, node=node, ipv6=ip6)
        node.pods.append(pod)
        return pod

    def add_external(self, node: Node, name: str, ipv4: str, *, node_ip: str,
                     node_ifname: str = "eth0", prefixlen: int = 24, ifname: str = "eth0",
                     ipv6: str | None = None, node_ipv6: str | None = None, prefixlen6: int = 64) -> External:
        """A host ``<prefix>-<name>`` on ``ipv4``/``prefixlen``, linked to the node's ``node_ifname``
        (``node_ip``/``prefixlen``), default route via ``node_ip``; with ``ipv6`` and ``node_ipv6``,
        dual stack: the same on ``ipv6``/``prefixlen6``, default route via ``node_ipv6``."""
        net = ipaddress.IPv4Interface(f"{ipv4}/{prefixlen}").network
        if ipaddress.IPv4Address(node_ip) not in net or node_ip == ipv4:
            raise ValueError(f"node_ip {node_ip} must be another address in {net}")
        if (ipv6 is None) != (node_ipv6 is None):
            raise ValueError(f"external {name}: ipv6 and node_ipv6 go together")
        ip6 = node_ip6 = None
        if ipv6 is not None and node_ipv6 is not None:
            ip6, node_ip6 = _ipv6_address(ipv6, f"external {name}"), _ipv6_address(node_ipv6, "node_ipv6")
            net6 = ipaddress.IPv6Interface(f"{ip6}/{prefixlen6}").network
            if ipaddress.IPv6Address(node_ip6) not in net6 or node_ip6 == ip6:
                raise ValueError(f"node_ipv6 {node_ip6} must be another address in {net6}")
        for n in (node_ifname, ifname):
            if not 0 < len(n) <= IFNAMSIZ or "/" in n or "." in n or " " in n:
                raise ValueError(f"interface name {n!r} is not usable (1-{IFNAMSIZ} characters)")
        ns = self._create_ns(name)
        idx_node, _ = self._veth(node, node_ifname, ns, ifname)
        with enter(node.netns):
            sysctl(f"net.ipv4.conf.{node_ifname}.rp_filter", 0)
            sysctl(f"net.ipv6.conf.{node_ifname}.disable_ipv6", 1)
        with rtnl(node.netns) as ipr:
            ipr.addr("add", index=idx_node, address=node_ip, prefixlen=prefixlen)
            ipr.link("set", index=idx_node, state="up")
        with enter(ns):
            sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", 1)
        with rtnl(ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=ipv4, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway=node_ip)
        if ip6 is not None and node_ip6 is not None:
            _enable_ipv6(node.netns, node_ifname)
            _enable_ipv6(ns, ifname)
            with rtnl(node.netns) as ipr:
                ipr.addr("add", index=idx_node, address=node_ip6, prefixlen=prefixlen6)
            with rtnl(ns) as ipr:
                ipr.addr("add", index=idx, address=ip6, prefixlen=prefixlen6)
                ipr.route("add", dst="::", dst_len=0, gateway=node_ip6)
        _wait_oper_up(ns, idx)
        _wait_oper_up(node.netns, idx_node)
        ext = External(name=name, netns=ns, ipv4=str(ipaddress.IPv4Address(ipv4)), prefixlen=prefixlen,
                       ifname=ifname, ifindex=idx, node_ip=node_ip, node_ifname=node_ifname,
                       ifindex_node=idx_node, node=node, ipv6=ip6, node_ipv6=node_ip6, prefixlen6=prefixlen6)
        node.externals.append(ext)
        return ext

    def add_service_range(self, node: Node, cidr: str, ifname: str = "svc0") -> None:
        """Make ``node`` answer its pods' ARP for service addresses in ``cidr``.

        Pods ARP for every destination and the node answers by proxy ARP only for
        addresses it has a route to through another device: a device ``ifname`` (one end
        of a veth pair kept inside the node; not every kernel has the dummy driver) holds
        that route. The datapath rewrites such packets before routing, so nothing is
        ever sent there.
        """
        net = ipaddress.IPv4Network(cidr)
        with rtnl(node.netns) as ipr:
            if not ipr.link_lookup(ifname=ifname):
                ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": f"{ifname}p"})
                ipr.link("set", index=ipr.link_lookup(ifname=f"{ifname}p")[0], state="up")
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=str(net.network_address), dst_len=net.prefixlen, oif=idx)

    # --- running things inside -------------------------------------------------------------

    def popen(self, host: Host | str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(argv, **kw)`` inside the host's namespace (``ip netns exec``).

        The process gets its own session (``start_new_session=True`` unless given), so
        a terminal's Ctrl-C does not reach it; :meth:`close` kills its process group.
        """
        self._check_open()
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", _ns_of(host), *argv], **kw)
        with self._lock:
            self._procs = [q for q in self._procs if q.returncode is None]
            self._procs.append(p)
        return p

    def run(self, host: Host | str, argv: Sequence[str], *, timeout: float | None = 30,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run(argv, timeout=timeout, **kw)`` inside the host's namespace."""
        self._check_open()
        return subprocess.run(["ip", "netns", "exec", _ns_of(host), *argv], timeout=timeout, **kw)

    # --- cleanup ---------------------------------------------------------------------------

    def _kill_procs(self) -> None:
        procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                try:
                    if os.getpgid(p.pid) == p.pid:
                        os.killpg(p.pid, signal.SIGKILL)
                    else:
                        p.kill()
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=_KILL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.warning("process did not exit after SIGKILL", pid=p.pid, topology=self.prefix)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()

    def close(self) -> None:
        """Kill the processes started here and remove every namespace created here.

        Idempotent; safe to call again after an interruption (it goes on where it
        stopped); does nothing in a forked child.
        """
        if self._closed or os.getpid() != self._pid:
            return
        with _signals_deferred(), self._lock:
            if self._closed:
                return
            self._kill_procs()
            pids = _netns.ns_pids() if self._namespaces else {}
            for ns in reversed(list(self._namespaces)):
                try:
                    if _remove_ns(ns, pids):
                        log.info("netns removed", netns=ns, topology=self.prefix)
                except OSError as e:
                    log.error("netns not removed", netns=ns, topology=self.prefix, error=str(e))
                    continue
                self._namespaces.remove(ns)
            self._closed = True
            with _live_lock:
                _live.discard(self)
                if not _live:
                    _uninstall_sigterm()

    @staticmethod
    def cleanup_stale(prefix: str) -> list[str]:
        """Remove namespaces left behind by an interrupted run with this prefix.

        Matches ``<prefix>-*`` (or ``<prefix>*`` when the prefix ends in ``-``), kills
        processes still running in them, and skips namespaces of topologies alive in
        this process. Returns the names removed.
        """
        if not prefix:
            raise ValueError("cleanup_stale needs a non-empty prefix")
        head = prefix if prefix.endswith("-") else prefix + "-"
        with _live_lock:
            ours = {ns for t in _live for ns in t._namespaces}
        stale = sorted(ns for ns in _netns.listnetns() if ns.startswith(head) and ns not in ours)
        gone: list[str] = []
        if not stale:
            return gone
        pids = _netns.ns_pids()
        for ns in stale:
            if _remove_ns(ns, pids):
                log.info("netns removed", netns=ns, stale=True)
                gone.append(ns)
        return gone

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._namespaces)} namespaces"
        return f"<Topology {self.prefix}: {state}>"
