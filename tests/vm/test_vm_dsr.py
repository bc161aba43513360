"""LoadBalancer with Direct Server Return over Geneve across three nodes, in the 6.1 VM (the host kernel has
no geneve module), for an IPv4 service and an IPv6 one (over an IPv6 underlay and over an IPv4 one).

    client 192.168.50.1  fd00:50::1  ─┐
    node-a 192.168.50.10 fd00:50::10  ├─ bridge (namespace "fab")   VIP 172.190.0.17:80 | [2001:db8:ff::17]:80
    node-b 192.168.50.11 fd00:50::11  ├─ pod-b 10.64.1.39 fd00:64:1::39 (backend)
    node-c 192.168.50.12 fd00:50::12 ─┘  pod-c 10.64.2.40 fd00:64:2::40

Each node is a namespace with its own pin root, its NIC ``eth0`` and the overlay device ``tpl_geneve0``
created by ``node_apply.apply``. The client reaches the VIP through node-a (its route), node-a forwards over
Geneve to the backend's node (its ``node=`` address: the underlay), and the reply leaves that node from
VIP:80 straight to the client: node-a never sees it (iptables/ip6tables counters in node-a's raw table count
packets from the VIP or the backend: zero).

One fabric per case (:data:`CASES`): ``v4`` (IPv4 service, IPv4 underlay; IPv6 off everywhere),
``v6-u6`` (IPv6 service, backends ``node=`` the nodes' IPv6 addresses) and ``v6-u4`` (IPv6 service,
``node=`` their IPv4 addresses). Every test runs in each; the assertions are the same, with the case's
addresses, tables and counters.
"""
from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tuplet.bpf.bpffs import BPFFS
from tuplet.conntrack import records as ct
from tuplet.conntrack.gc import CtGc, Method
from tuplet.datapath import abi, metrics, paths
from tuplet.datapath.layouts import CtTuple4, CtTuple6, Nat4Entry, Nat6Entry, be32_to_ip, bytes_to_ip6
from tuplet.lb.model import host_port
from tuplet.node import apply as node_apply
from tuplet.node import config

# A fabric's setup loads every node's programs under the 6.1 verifier in software emulation: minutes on a
# loaded machine, beyond the suite's 300 s per test.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]

HOSTS = ("client", "a", "b", "c")
PY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python")


@dataclass(frozen=True)
class Family:
    """What differs between IPv4 and IPv6 in this test: addresses, the tables, the tools."""

    hosts: dict[str, str]    # the client's and the nodes' address on the bridge
    pods: dict[str, str]     # pod on node a, b, c
    vips: tuple[str, str, str]   # VIP (pod-b), VIP_SPREAD (pod-b, pod-c), VIP_LOCAL (pod-a, tcp)
    any_addr: str
    icmp: str
    ct_maps: tuple[str, ...]
    nat_map: str
    nat_key: type[CtTuple4] | type[CtTuple6]
    nat_val: type[Nat4Entry] | type[Nat6Entry]
    text: Callable[[Any], str]   # an address as a layout holds it, as text
    iptables: str


V4 = Family(hosts=dict(zip(HOSTS, ("192.168.50.1", "192.168.50.10", "192.168.50.11", "192.168.50.12"))),
            pods={"a": "10.64.0.41", "b": "10.64.1.39", "c": "10.64.2.40"},
            vips=("172.190.0.17", "172.190.0.18", "172.190.0.19"), any_addr="0.0.0.0", icmp="ICMP",
            ct_maps=abi.CT_MAPS, nat_map=abi.NAT_MAP, nat_key=CtTuple4, nat_val=Nat4Entry, text=be32_to_ip,
            iptables="iptables")
V6 = Family(hosts=dict(zip(HOSTS, ("fd00:50::1", "fd00:50::10", "fd00:50::11", "fd00:50::12"))),
            pods={"a": "fd00:64::41", "b": "fd00:64:1::39", "c": "fd00:64:2::40"},
            vips=("2001:db8:ff::17", "2001:db8:ff::18", "2001:db8:ff::19"), any_addr="::", icmp="ICMPv6",
            ct_maps=abi.CT6_MAPS, nat_map=abi.NAT6_MAP, nat_key=CtTuple6, nat_val=Nat6Entry, text=bytes_to_ip6,
            iptables="ip6tables")
GATEWAY6 = "fe80::1"   # the node's side of every pod veth


@dataclass(frozen=True)
class Case:
    """One run of the test: the service's family and the underlay's (the backends' node= addresses)."""

    id: str
    fam: Family
    underlay: Family

    @property
    def dual_stack(self) -> bool:
        return self.fam is V6 or self.underlay is V6


CASES = (Case("v4", V4, V4), Case("v6-u6", V6, V6), Case("v6-u4", V6, V4))

SERVER = textwrap.dedent("""
    import socket, sys, threading
    any_addr = sys.argv[1]
    fam = socket.AF_INET6 if ":" in any_addr else socket.AF_INET
    def tcp():
        s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((any_addr, 8000)); s.listen(64)
        while True:
            c, _ = s.accept()
            def echo(c=c):
                while True:
                    d = c.recv(4096)
                    if not d:
                        break
                    c.sendall(d)
                c.close()
            threading.Thread(target=echo, daemon=True).start()
    threading.Thread(target=tcp, daemon=True).start()
    u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((any_addr, 8000))
    print("ready", flush=True)
    while True:
        d, a = u.recvfrom(4096); u.sendto(d, a)
""")


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=check, capture_output=True, text=True,
                          timeout=30)


def sysctl(ns: str, **kv: str) -> None:
    sh(ns, "sysctl", "-q", "-w", *(f"{k.replace('__', '.')}={v}" for k, v in kv.items()))


class Fabric:
    def __init__(self, case: Case) -> None:
        tag = uuid.uuid4().hex[:5]
        self.case = case
        self.fam = case.fam
        self.client = case.fam.hosts["client"]
        self.pods = case.fam.pods
        self.vip, self.vip_spread, self.vip_local = case.fam.vips
        self.ns = {n: f"tpl-dsr-{n}-{tag}" for n in ("fab", "client", "a", "b", "c", "poda", "podb", "podc")}
        self.pin = {n: f"{BPFFS}/tuplet/test/dsr-{n}-{tag}" for n in ("a", "b", "c")}
        self.procs: list[subprocess.Popen[str]] = []

    def build(self) -> None:
        subprocess.run(["modprobe", "geneve"], check=True)
        v6 = self.case.dual_stack
        for n, ns in self.ns.items():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            sh(ns, "ip", "link", "set", "lo", "up")
            # IPv6 only where a case needs it, without DAD (addresses usable at once) nor router solicitations
            # (no traffic but the test's; neighbours are permanent).
            ipv6_off = "0" if v6 and n != "fab" else "1"
            sysctl(ns, net__ipv4__conf__all__rp_filter="0", net__ipv4__conf__default__rp_filter="0",
                   net__ipv6__conf__all__disable_ipv6=ipv6_off, net__ipv6__conf__default__disable_ipv6=ipv6_off)
            if ipv6_off == "0":
                sysctl(ns, net__ipv6__conf__all__accept_dad="0", net__ipv6__conf__default__accept_dad="0",
                       net__ipv6__conf__default__router_solicitations="0")
        fab = self.ns["fab"]
        sh(fab, "ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh(fab, "ip", "link", "set", "br0", "up")
        macs = {}
        for n in HOSTS:
            ns = self.ns[n]
            sh(fab, "ip", "link", "add", f"p-{n}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(fab, "ip", "link", "set", f"p-{n}", "master", "br0", "up")
            sh(ns, "ip", "addr", "add", f"{V4.hosts[n]}/24", "dev", "eth0")
            if v6:
                sh(ns, "ip", "addr", "add", f"{V6.hosts[n]}/64", "dev", "eth0", "nodad")
            sh(ns, "ip", "link", "set", "eth0", "up")
            macs[n] = json.loads(sh(ns, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
        if v6:   # every host on the bridge knows the others: no neighbour discovery during the tests
            for n in HOSTS:
                for peer in HOSTS:
                    if peer != n:
                        sh(self.ns[n], "ip", "-6", "neigh", "replace", V6.hosts[peer], "lladdr", macs[peer],
                           "dev", "eth0", "nud", "permanent")
        for vip in self.fam.vips:
            sh(self.ns["client"], "ip", "route", "add", vip, "via", self.fam.hosts["a"])
        for node in ("a", "b", "c"):
            ns, pns, pod = self.ns[node], self.ns[f"pod{node}"], f"pod{node}"
            sysctl(ns, net__ipv4__ip_forward="1")
            sh(ns, "ip", "link", "add", f"lxc-{pod}", "type", "veth", "peer", "name", "eth0", "netns", pns)
            sh(ns, "ip", "link", "set", f"lxc-{pod}", "up")
            sysctl(ns, **{f"net__ipv4__conf__lxc-{pod}__proxy_arp": "1"})
            sh(ns, "ip", "route", "add", f"{V4.pods[node]}/32", "dev", f"lxc-{pod}")
            sh(pns, "ip", "addr", "add", f"{V4.pods[node]}/32", "dev", "eth0")
            sh(pns, "ip", "link", "set", "eth0", "up")
            sh(pns, "ip", "route", "add", "default", "dev", "eth0", "scope", "link")
            if v6:
                sysctl(ns, net__ipv6__conf__all__forwarding="1")
                sh(ns, "ip", "addr", "add", f"{GATEWAY6}/64", "dev", f"lxc-{pod}", "nodad")
                sh(ns, "ip", "-6", "route", "add", f"{V6.pods[node]}/128", "dev", f"lxc-{pod}")
                sh(pns, "ip", "addr", "add", f"{V6.pods[node]}/128", "dev", "eth0", "nodad")
                sh(pns, "ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
        # node-a: count what comes back from the VIP or the backends (a reply through the LB node).
        # The client's is a control (its flows to the VIP are redirected at tc ingress, before netfilter: a
        # ping shows the counters count).
        for src in (*self.fam.vips[:2], self.pods["b"], self.pods["c"], self.client):
            sh(self.ns["a"], self.fam.iptables, "-t", "raw", "-A", "PREROUTING", "-s", src, "-j", "ACCEPT")

    def config(self, node: str) -> config.NodeConfig:
        pod = f"pod{node}"
        text = f"""
            [node]
            name = "node-{node}"
            netns = "{self.ns[node]}"
            pin_root = "{self.pin[node]}"
            attach_mode = "auto"
            [[devices]]
            ifname = "eth0"
            [overlay]
            device = "tpl_geneve0"
            [lb]
            socket_lb = false
            [conntrack]
            map_dynamic_size_ratio = 0
            tcp_max = 65536
            any_max = 65536
            nat_max = 65536
            [[endpoints]]
            name = "{pod}"
            ifname = "lxc-{pod}"
            ipv4 = "{V4.pods[node]}"
            identity = 3096
        """
        if self.case.dual_stack:
            text += f"""
            ipv6 = "{V6.pods[node]}"
            """
        if node == "a":
            remote = {n: f'"{host_port(self.pods[n], 8000)},node={self.case.underlay.hosts[n]}"' for n in "bc"}
            for proto in ("tcp", "udp"):
                text += f"""
            [[services]]
            name = "lb-{proto}"
            type = "LoadBalancer"
            address = "{self.vip}"
            port = 80
            protocol = "{proto}"
            backends = [{remote["b"]}]
            [[services]]
            name = "spread-{proto}"
            type = "LoadBalancer"
            address = "{self.vip_spread}"
            port = 80
            protocol = "{proto}"
            backends = [{remote["b"]}, {remote["c"]}]
            """
            text += f"""
            [[services]]
            name = "local-tcp"
            type = "LoadBalancer"
            address = "{self.vip_local}"
            port = 80
            protocol = "tcp"
            backends = ["{host_port(self.pods["a"], 8000)}"]
            """
        return config.parse(textwrap.dedent(text))

    def start_servers(self) -> None:
        for pod in ("poda", "podb", "podc"):
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[pod], PY, "-c", SERVER, self.fam.any_addr],
                                 stdout=subprocess.PIPE, text=True)
            self.procs.append(p)
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for n, pin in self.pin.items():
            with contextlib.suppress(Exception):
                node_apply.teardown(pin, self.ns[n])
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)

    # --- what the tests read -------------------------------------------------------------------------

    def ct_records(self, node: str) -> list[ct.CtRecord]:
        out: list[ct.CtRecord] = []
        for name in self.fam.ct_maps:
            with paths.open_pinned(self.pin[node], name) as m:
                out.extend(ct.records(m))
        return out

    def nat_entries(self, node: str) -> dict[tuple[str, int, str, int, int], tuple[str, int]]:
        """The node's NAT entries of the case's family: reply tuple -> (address, port) it is rewritten to."""
        out = {}
        text = self.fam.text
        with paths.open_pinned(self.pin[node], self.fam.nat_map) as m:
            for k, v in m.items():
                t = self.fam.nat_key.from_buffer_copy(k)
                e = self.fam.nat_val.from_buffer_copy(v)
                key = (text(t.saddr), socket.ntohs(t.sport), text(t.daddr), socket.ntohs(t.dport), t.nexthdr)
                out[key] = (text(e.to_addr), socket.ntohs(e.to_port))
        return out

    def raw_counts(self) -> dict[str, int]:
        """Packets node-a's raw PREROUTING counted, by source address."""
        res = sh(self.ns["a"], self.fam.iptables, "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x")
        out = {}
        for line in res.stdout.splitlines()[2:]:
            cols = line.split()
            if cols:
                out[cols[-2].split("/")[0]] = int(cols[0])
        return out

    def reasons(self, node: str, direction: str = "netdev_ingress") -> dict[str, int]:
        """Verdict counters of one metric direction (cil_from_overlay counts as netdev_ingress too)."""
        obj = str(paths.object_dir() / abi.OBJ_OVERLAY)
        out: dict[str, int] = {}
        with paths.open_pinned(self.pin[node], abi.METRICS_MAP) as m:
            for c in metrics.read(m, metrics.reason_names(obj), metrics.direction_names(obj)):
                if c.direction == direction:
                    out[c.reason] = out.get(c.reason, 0) + c.packets
        return out

    def client_proc(self, script: str, *argv: str) -> subprocess.Popen[str]:
        """``script`` running in the client with a pipe both ways; killed on close."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns["client"], PY, "-c", script, *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None and p.stdin is not None
        return p


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def fabric(request: pytest.FixtureRequest) -> Iterator[Fabric]:
    f = Fabric(request.param)
    try:
        f.build()
        for node in ("a", "b", "c"):
            node_apply.apply(f.config(node))
        f.start_servers()
        yield f
    finally:
        f.close()


CLIENT_TCP = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], 80), timeout=5)
    print(s.getsockname()[1], s.getpeername()[0], s.getpeername()[1], flush=True)
    s.sendall(b"hello"); print(s.recv(100).decode(), flush=True)
    sys.stdin.readline()
    s.sendall(b"again"); print(s.recv(100).decode(), flush=True)
    s.close()
""")


def test_tcp_dsr_through_three_nodes(fabric: Fabric) -> None:
    f = fabric
    client, pod_b, vip = f.client, f.pods["b"], f.vip
    before = f.raw_counts()
    untracked = f.reasons("a").get("PASS_NETDEV_UNTRACKED", 0)
    cl = f.client_proc(CLIENT_TCP, vip)
    assert cl.stdout is not None and cl.stdin is not None
    sport_s, peer, pport = cl.stdout.readline().split()
    sport = int(sport_s)
    assert (peer, int(pport)) == (vip, 80)    # the client's socket talks to VIP:80: replies came from there
    assert cl.stdout.readline().strip() == "hello"

    # While the connection lives: SVC on node-a; IN FromTunnel and OUT DSRInternal on node-b; the NAT entry.
    a = f.ct_records("a")
    svc = [r for r in a if r.proto == "TCP" and r.direction == "SVC" and r.src == (client, sport)]
    assert len(svc) == 1 and svc[0].dst == (vip, 80), [r.line() for r in a]
    assert svc[0].entry.backend_id and svc[0].entry.rev_nat_index
    assert not [r for r in a if r.direction in ("IN", "OUT") and r.src == (client, sport)], [r.line() for r in a]
    b = f.ct_records("b")
    mine = [r for r in b if r.src == (client, sport)]
    by = {(r.proto, r.direction, r.related): r for r in mine}
    assert set(by) == {("TCP", "IN", False), ("TCP", "OUT", False)}, [r.line() for r in b]
    for r in mine:
        assert r.dst == (pod_b, 8000)
    assert "FromTunnel" in by["TCP", "IN", False].entry.flag_names
    assert "DSRInternal" not in by["TCP", "IN", False].entry.flag_names
    out = by["TCP", "OUT", False]
    assert "DSRInternal" in out.entry.flag_names and "FromTunnel" not in out.entry.flag_names
    assert out.entry.src_sec_id == 2
    nat = f.nat_entries("b")
    assert nat.get((pod_b, 8000, client, sport, 6)) == (vip, 80), nat   # the reply's tuple
    assert not f.ct_records("c")

    cl.stdin.write("\n")
    cl.stdin.flush()
    assert cl.stdout.readline().strip() == "again"
    assert cl.wait(timeout=10) == 0
    time.sleep(0.5)

    # The replies never passed node-a; the client's packets did.
    after = f.raw_counts()
    assert after[vip] == after[pod_b] == 0, after
    red = f.reasons("a")
    assert red.get("PASS_DSR_REDIRECT", 0) >= 5, red   # SYN, ACK, 2 data, FIN, ACK...
    # Nothing but the client's flow entered node-a's NIC meanwhile: no reply came back through it.
    assert red.get("PASS_NETDEV_UNTRACKED", 0) == untracked, red
    sh(f.ns["client"], "ping", "-c", "1", "-W", "2", f.fam.hosts["a"])
    assert f.raw_counts()[client] - before[client] >= 1
    b = f.ct_records("b")
    lines = {(r.direction, r.related): r.line() for r in b if r.src == (client, sport) and r.proto == "TCP"}
    # `tuplet ct list`'s lines, an IPv6 address bracketed as the reference prints it
    flow = f"{host_port(client, sport)} -> {host_port(pod_b, 8000)} expires="
    assert lines["IN", False].startswith(f"TCP IN {flow}") and lines["OUT", False].startswith(f"TCP OUT {flow}")
    assert "[ RxClosing TxClosing SeenNonSyn FromTunnel ]" in lines["IN", False], lines
    assert "[ RxClosing TxClosing SeenNonSyn DSRInternal ]" in lines["OUT", False], lines
    for line in lines.values():   # as the seed's node B: FIN|SYN|PSH|ACK both ways
        assert "RxFlagsSeen=0x1b" in line and "TxFlagsSeen=0x1b" in line, line
        assert "Flags=0x0413" in line or "Flags=0x0093" in line, line
    icmp = [r for r in b if r.proto == f.fam.icmp and r.src[0] == client]
    assert len(icmp) == 1 and icmp[0].direction == "IN" and icmp[0].related, [r.line() for r in b]
    assert "FromTunnel" in icmp[0].entry.flag_names
    a = f.ct_records("a")
    svc = [r for r in a if r.proto == "TCP" and r.direction == "SVC" and r.src == (client, sport)]
    assert svc[0].line().startswith(f"TCP SVC {host_port(client, sport)} -> {host_port(vip, 80)} expires=")
    assert "[ RxClosing TxClosing SeenNonSyn ]" in svc[0].line(), svc[0].line()


CLIENT_UDP = textwrap.dedent("""
    import socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(5); u.bind((sys.argv[2], 40123))
    for msg in (b"one", b"two"):
        u.sendto(msg, (sys.argv[1], 80))
        d, a = u.recvfrom(100)
        print(d.decode(), a[0], a[1], flush=True)
""")


def test_udp_dsr(fabric: Fabric) -> None:
    f = fabric
    client, pod_b, vip = f.client, f.pods["b"], f.vip
    res = sh(f.ns["client"], PY, "-c", CLIENT_UDP, vip, f.fam.any_addr)
    assert res.stdout.split("\n")[:2] == [f"one {vip} 80", f"two {vip} 80"], res.stdout
    b = f.ct_records("b")
    mine = {(r.proto, r.direction): r for r in b if r.src == (client, 40123)}
    assert set(mine) == {("UDP", "IN"), ("UDP", "OUT")}, [r.line() for r in b]
    assert "FromTunnel" in mine["UDP", "IN"].entry.flag_names
    assert "DSRInternal" in mine["UDP", "OUT"].entry.flag_names
    assert f.nat_entries("b").get((pod_b, 8000, client, 40123, 17)) == (vip, 80)
    a = f.ct_records("a")
    assert [r.direction for r in a if r.src == (client, 40123)] == ["SVC"]
    counts = f.raw_counts()
    assert counts[vip] == counts[pod_b] == 0, counts


def _ip_header(f: Fabric, payload_len: int) -> tuple[bytes, int]:
    """The inner IP header client -> pod-b (UDP) of the case's family, and its ethertype."""
    fam = socket.AF_INET6 if f.fam is V6 else socket.AF_INET
    src, dst = socket.inet_pton(fam, f.client), socket.inet_pton(fam, f.pods["b"])
    if f.fam is V6:   # the UDP checksum stays 0: the packet is dropped before anything checks it
        return struct.pack("!IHBB", 6 << 28, payload_len, 17, 64) + src + dst, 0x86DD
    hdr = struct.pack("!BBHHHBBH", 0x45, 0, 20 + payload_len, 0, 0x4000, 64, 17, 0) + src + dst
    csum = sum(struct.unpack("!10H", hdr))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:], 0x0800


def _geneve_frame(f: Fabric, opts: bytes, sport: int) -> bytes:
    """A Geneve payload (no outer headers: sent on a UDP socket to port 6081) carrying an Ethernet
    frame with UDP client:sport -> pod-b:8000 of the case's family."""
    payload = b"bad"
    udp = struct.pack("!HHHH", sport, 8000, 8 + len(payload), 0) + payload
    ip_hdr, ethertype = _ip_header(f, len(udp))
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + struct.pack("!H", ethertype)
    critical = any(opts[i + 2] & 0x80 for i in range(0, len(opts), 4) if i + 2 < len(opts)) if opts else False
    gnv = struct.pack("!BBHI", len(opts) // 4, 0x40 if critical else 0, 0x6558, 0)
    return gnv + opts + eth + ip_hdr + udp


def _opt(cls: int, typ: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HBB", cls, typ, len(body) // 4 if length is None else length) + body


def _bad_options(f: Fabric) -> dict[str, bytes]:
    good = socket.inet_pton(socket.AF_INET6 if f.fam is V6 else socket.AF_INET, f.vip) + struct.pack("!HH", 80, 0)
    return {
        "DSR_OPT_MALFORMED": _opt(0x014B, 0x81, good, length=1),
        "DSR_OPT_CRITICAL": _opt(0x0102, 0x85, good),
        "DSR_OPT_NOT_ALONE": _opt(0x014B, 0x81, good) + _opt(0x0102, 0x01, b""),
    }


SEND_RAW = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 6081))
""")


def test_bad_geneve_options_dropped_with_reason(fabric: Fabric) -> None:
    f = fabric
    nat_before = f.nat_entries("b")
    before = f.reasons("b")
    bad = _bad_options(f)
    for i, opts in enumerate(bad.values()):
        sh(f.ns["client"], PY, "-c", SEND_RAW, _geneve_frame(f, opts, 41000 + i).hex(), f.case.underlay.hosts["b"])
    time.sleep(0.5)
    after = f.reasons("b")
    for reason in bad:
        assert after.get(f"DROP_{reason}", 0) - before.get(f"DROP_{reason}", 0) == 1, (reason, after)
    b = f.ct_records("b")
    assert not [r for r in b if r.src[0] == f.client and 41000 <= r.src[1] < 41010], [r.line() for r in b]
    assert f.nat_entries("b") == nat_before


def test_overlay_device_attached(fabric: Fabric) -> None:
    res = sh(fabric.ns["b"], "ip", "-d", "-j", "link", "show", "tpl_geneve0")
    assert '"external":true' in res.stdout.replace(" ", "")
    res = sh(fabric.ns["b"], "tc", "filter", "show", "dev", "tpl_geneve0", "ingress")
    assert "cil_from_overla" in res.stdout    # tc shows the first 15 characters


CLIENT_MANY = textwrap.dedent("""
    import socket, sys
    vip, n = sys.argv[1], int(sys.argv[2])
    conns = [socket.create_connection((vip, 80), timeout=10) for _ in range(n)]
    for i, s in enumerate(conns):
        s.sendall(b"req%d" % i)
    for i, s in enumerate(conns):
        print(s.getsockname()[1], s.getpeername()[0], s.getpeername()[1], s.recv(100).decode(), flush=True)
    print("done", flush=True)
    sys.stdin.readline()
    for i, s in enumerate(conns):
        s.sendall(b"bye%d" % i)
        assert s.recv(100) == b"bye%d" % i
        s.close()
    print("closed", flush=True)
""")

N_TCP = 36
N_UDP = 24
PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}


def _spread(f: Fabric, proto: str, sports: set[int]) -> dict[str, dict[int, dict[str, ct.CtRecord]]]:
    """The client's flows on each backend node, by source port (direction -> record); each on exactly one
    node, with its DSRInternal/FromTunnel pair and its NAT entry to VIP_SPREAD:80; some on each."""
    flows: dict[str, dict[int, dict[str, ct.CtRecord]]] = {"b": {}, "c": {}}
    for n, by_port in flows.items():
        for r in f.ct_records(n):
            if r.proto == proto and not r.related and r.src[0] == f.client and r.src[1] in sports:
                assert r.dst == (f.pods[n], 8000), r.line()
                by_port.setdefault(r.src[1], {})[r.direction] = r
    per_backend = {n: len(v) for n, v in flows.items()}
    assert set(flows["b"]).isdisjoint(flows["c"]) and sum(per_backend.values()) == len(sports), per_backend
    assert per_backend["b"] > 0 and per_backend["c"] > 0, per_backend
    for n, by_port in flows.items():
        nat = f.nat_entries(n)
        for sport, by in by_port.items():
            assert set(by) == {"IN", "OUT"}, {d: r.line() for d, r in by.items()}
            assert "DSRInternal" in by["OUT"].entry.flag_names and "FromTunnel" in by["IN"].entry.flag_names
            assert nat.get((f.pods[n], 8000, f.client, sport, PROTO[proto])) == (f.vip_spread, 80)
    # node-a counted no packet from the VIP or a backend: no reply passed it
    counts = f.raw_counts()
    assert counts[f.vip_spread] == counts[f.pods["b"]] == counts[f.pods["c"]] == 0, counts
    print(f"{f.case.id}: {proto} flows per backend node: {per_backend}")
    return flows


def test_tcp_many_connections_spread_over_two_backend_nodes(fabric: Fabric) -> None:
    f = fabric
    untracked = f.reasons("a").get("PASS_NETDEV_UNTRACKED", 0)
    cl = f.client_proc(CLIENT_MANY, f.vip_spread, str(N_TCP))
    assert cl.stdout is not None and cl.stdin is not None
    lines = [cl.stdout.readline().split() for _ in range(N_TCP)]
    assert cl.stdout.readline().strip() == "done", lines
    sports = {int(sp) for sp, *_ in lines}
    assert len(sports) == N_TCP
    for i, (_, peer, pport, echo) in enumerate(lines):   # every connection: VIP:80, its own request echoed
        assert (peer, int(pport), echo) == (f.vip_spread, 80, f"req{i}"), lines[i]

    flows = _spread(f, "TCP", sports)
    # node-a: one SVC entry per connection, its backend the one whose node has the flow.
    svc = {r.src[1]: r for r in f.ct_records("a")
           if r.proto == "TCP" and r.direction == "SVC" and r.src[0] == f.client and r.src[1] in sports}
    assert set(svc) == sports and all(r.dst == (f.vip_spread, 80) for r in svc.values())
    ids = {n: {svc[sp].entry.backend_id for sp in flows[n]} for n in flows}
    assert len(ids["b"]) == len(ids["c"]) == 1 and ids["b"] != ids["c"], ids

    cl.stdin.write("\n")
    cl.stdin.flush()
    assert cl.stdout.readline().strip() == "closed"
    assert cl.wait(timeout=20) == 0
    time.sleep(0.5)
    counts = f.raw_counts()
    assert counts[f.vip_spread] == counts[f.pods["b"]] == counts[f.pods["c"]] == 0, counts
    red = f.reasons("a")
    assert red.get("PASS_NETDEV_UNTRACKED", 0) == untracked, red


CLIENT_UDP_MANY = textwrap.dedent("""
    import socket, sys
    vip, any_addr, base, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for i in range(n):
        u = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5); u.bind((any_addr, base + i))
        u.sendto(b"u%d" % i, (vip, 80))
        d, a = u.recvfrom(100)
        print(base + i, a[0], a[1], d.decode(), flush=True)
        u.close()
""")


def test_udp_spread_over_two_backend_nodes(fabric: Fabric) -> None:
    f = fabric
    base = 40200
    res = sh(f.ns["client"], PY, "-c", CLIENT_UDP_MANY, f.vip_spread, f.fam.any_addr, str(base), str(N_UDP))
    got = [line.split() for line in res.stdout.splitlines()]
    assert got == [[str(base + i), f.vip_spread, "80", f"u{i}"] for i in range(N_UDP)], res.stdout
    _spread(f, "UDP", set(range(base, base + N_UDP)))


def test_local_backend_on_the_lb_node(fabric: Fabric) -> None:
    f = fabric
    client, pod_a = f.client, f.pods["a"]
    redirects = f.reasons("a").get("PASS_DSR_REDIRECT", 0)
    cl = f.client_proc(CLIENT_TCP, f.vip_local)
    assert cl.stdout is not None and cl.stdin is not None
    sport_s, peer, pport = cl.stdout.readline().split()
    sport = int(sport_s)
    assert (peer, int(pport)) == (f.vip_local, 80)
    assert cl.stdout.readline().strip() == "hello"
    # As a local NodePort/LB backend: SVC client -> VIP:80; OUT client -> pod with NodePort, the service's
    # RevNAT and the NIC's ifindex (the reply's rev-NAT on the way out); the pod's IN entry and its related
    # ICMP twin; nothing of DSR.
    eth0 = json.loads(sh(f.ns["a"], "ip", "-j", "link", "show", "eth0").stdout)[0]["ifindex"]
    a = f.ct_records("a")
    mine = {(r.proto, r.direction, r.related): r for r in a if r.src[0] == client and r.src[1] in (sport, 0)
            and r.dst[0] in (f.vip_local, pod_a)}
    lines = [r.line() for r in mine.values()]
    assert set(mine) == {("TCP", "SVC", False), ("TCP", "OUT", False), ("TCP", "IN", False),
                         (f.fam.icmp, "IN", True)}, lines
    svc, out, inn = mine["TCP", "SVC", False], mine["TCP", "OUT", False], mine["TCP", "IN", False]
    assert svc.dst == (f.vip_local, 80) and svc.entry.backend_id and svc.entry.rev_nat_index, lines
    assert out.dst == inn.dst == (pod_a, 8000), lines
    assert "NodePort" in out.entry.flag_names and out.entry.rev_nat_index == svc.entry.rev_nat_index, lines
    assert out.entry.ifindex == eth0, lines
    assert inn.entry.rev_nat_index == 0 and "NodePort" not in inn.entry.flag_names, lines
    for r in mine.values():
        assert not {"DSRInternal", "FromTunnel"} & set(r.entry.flag_names), r.line()
    cl.stdin.write("\n")
    cl.stdin.flush()
    assert cl.stdout.readline().strip() == "again"
    assert cl.wait(timeout=10) == 0
    assert f.reasons("a").get("PASS_DSR_REDIRECT", 0) == redirects   # no Geneve for a local backend
    for n in ("b", "c"):
        assert not [r for r in f.ct_records(n) if r.src == (client, sport)]


@pytest.mark.parametrize("method", [Method.KERNEL, Method.BATCH])
def test_nat_entry_lives_with_the_connection_and_goes_with_gc(fabric: Fabric, method: Method) -> None:
    f = fabric
    client, pod_b, vip = f.client, f.pods["b"], f.vip
    cl = f.client_proc(CLIENT_TCP, vip)
    assert cl.stdout is not None and cl.stdin is not None
    sport = int(cl.stdout.readline().split()[0])
    assert cl.stdout.readline().strip() == "hello"
    key = (pod_b, 8000, client, sport, 6)

    def mine() -> list[ct.CtRecord]:
        return [r for r in f.ct_records("b") if r.src == (client, sport)]

    with contextlib.ExitStack() as st:
        maps = [st.enter_context(paths.open_pinned(f.pin["b"], name)) for name in f.fam.ct_maps]
        nat = st.enter_context(paths.open_pinned(f.pin["b"], f.fam.nat_map))
        with CtGc(maps, nat=nat, method=method) as g:
            # A pass now, while the connection lives: the entries and the NAT entry stay.
            g.run()
            assert len(mine()) == 2 and f.nat_entries("b").get(key) == (vip, 80)
            cl.stdin.write("\n")
            cl.stdin.flush()
            assert cl.stdout.readline().strip() == "again"
            assert cl.wait(timeout=10) == 0
            time.sleep(0.5)
            closed = mine()
            assert len(closed) == 2 and all("RxClosing" in r.entry.flag_names for r in closed)
            assert f.nat_entries("b").get(key) == (vip, 80)   # closed, not expired yet
            g.run()
            assert len(mine()) == 2 and f.nat_entries("b").get(key) == (vip, 80)
            # Past the closing timeout (the datapath's clock is CLOCK_MONOTONIC seconds, no offset on
            # pinned objects): a pass deletes both entries and the NAT entry the DSRInternal one owns.
            last = max(r.entry.lifetime for r in closed)
            res = g.run(now=last + 1)
            assert g.method is method
    assert res.nat_deleted >= 1, res
    assert not mine(), [r.line() for r in mine()]
    assert key not in f.nat_entries("b")


def test_underlay_and_pods_reachable(fabric: Fabric) -> None:
    """The fabric itself: node-a reaches the backend nodes over the case's underlay, the client each node
    and pod-b's node over the service's family, each pod its node (IPv6: through fe80::1)."""
    f = fabric   # last: the pods' pings make CT entries on their nodes
    for n in ("b", "c"):
        sh(f.ns["a"], "ping", "-c", "1", "-W", "2", f.case.underlay.hosts[n])
    for n in ("a", "b", "c"):
        sh(f.ns["client"], "ping", "-c", "1", "-W", "2", f.fam.hosts[n])
        sh(f.ns[f"pod{n}"], "ping", "-c", "1", "-W", "2", f.fam.hosts[n])

