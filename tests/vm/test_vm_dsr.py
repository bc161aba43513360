"""LoadBalancer with Direct Server Return over Geneve across three nodes, in the 6.1 VM (the host kernel has
no geneve module).

    client 192.168.50.1 ─┐
    node-a 192.168.50.10 ├─ bridge (namespace "fab")       VIP 172.190.0.17:80 (tcp, udp) on node-a
    node-b 192.168.50.11 ├─ pod-b 10.64.1.39 (backend)     backends: 10.64.1.39:8000,node=192.168.50.11
    node-c 192.168.50.12 ┘  pod-c 10.64.2.40 (idle)

Each node is a namespace with its own pin root, its NIC ``eth0`` and the overlay device ``tpl_geneve0``
created by ``node_apply.apply``. The client reaches the VIP through node-a (its route), node-a forwards over
Geneve to node-b, and the reply leaves node-b from VIP:80 straight to the client: node-a never sees it
(iptables counters in node-a's raw table count packets from the VIP or the backend: zero).
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
from pathlib import Path

import pytest

from tuplet.bpf.bpffs import BPFFS
from tuplet.conntrack import records as ct
from tuplet.conntrack.gc import CtGc
from tuplet.datapath import abi, metrics, paths
from tuplet.datapath.abi import NAT_MAP
from tuplet.datapath.layouts import CtTuple4, Nat4Entry, be32_to_ip
from tuplet.node import apply as node_apply
from tuplet.node import config

pytestmark = pytest.mark.vm

CLIENT, NODE_A, NODE_B, NODE_C = "192.168.50.1", "192.168.50.10", "192.168.50.11", "192.168.50.12"
POD_A, POD_B, POD_C = "10.64.0.41", "10.64.1.39", "10.64.2.40"
VIP = "172.190.0.17"       # backend pod-b only
VIP_SPREAD = "172.190.0.18"   # backends pod-b and pod-c (tcp, udp)
VIP_LOCAL = "172.190.0.19"    # backend pod-a, on node-a itself (tcp)
PY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python")

SERVER = textwrap.dedent("""
    import socket, sys, threading
    def tcp():
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 8000)); s.listen(64)
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
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 8000))
    print("ready", flush=True)
    while True:
        d, a = u.recvfrom(4096); u.sendto(d, a)
""")


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=check, capture_output=True, text=True,
                          timeout=30)


def sysctl(ns: str, **kv: str) -> None:
    for k, v in kv.items():
        sh(ns, "sysctl", "-q", "-w", f"{k.replace('__', '.')}={v}")


class Fabric:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.ns = {n: f"tpl-dsr-{n}-{tag}" for n in ("fab", "client", "a", "b", "c", "poda", "podb", "podc")}
        self.pin = {n: f"{BPFFS}/tuplet/test/dsr-{n}-{tag}" for n in ("a", "b", "c")}
        self.procs: list[subprocess.Popen[str]] = []

    def build(self) -> None:
        subprocess.run(["modprobe", "geneve"], check=True)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            sh(ns, "ip", "link", "set", "lo", "up")
            sysctl(ns, net__ipv6__conf__all__disable_ipv6="1", net__ipv4__conf__all__rp_filter="0",
                   net__ipv4__conf__default__rp_filter="0")
        fab = self.ns["fab"]
        sh(fab, "ip", "link", "add", "br0", "type", "bridge")
        sh(fab, "ip", "link", "set", "br0", "up")
        for n, addr in (("client", CLIENT), ("a", NODE_A), ("b", NODE_B), ("c", NODE_C)):
            ns = self.ns[n]
            sh(fab, "ip", "link", "add", f"p-{n}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(fab, "ip", "link", "set", f"p-{n}", "master", "br0", "up")
            sh(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            sh(ns, "ip", "link", "set", "eth0", "up")
        for vip in (VIP, VIP_SPREAD, VIP_LOCAL):
            sh(self.ns["client"], "ip", "route", "add", f"{vip}/32", "via", NODE_A)
        for node, pod, addr in (("a", "poda", POD_A), ("b", "podb", POD_B), ("c", "podc", POD_C)):
            ns, pns = self.ns[node], self.ns[pod]
            sysctl(ns, net__ipv4__ip_forward="1")
            sh(ns, "ip", "link", "add", f"lxc-{pod}", "type", "veth", "peer", "name", "eth0", "netns", pns)
            sh(ns, "ip", "link", "set", f"lxc-{pod}", "up")
            sysctl(ns, **{f"net__ipv4__conf__lxc-{pod}__proxy_arp": "1"})
            sh(ns, "ip", "route", "add", f"{addr}/32", "dev", f"lxc-{pod}")
            sh(pns, "ip", "addr", "add", f"{addr}/32", "dev", "eth0")
            sh(pns, "ip", "link", "set", "eth0", "up")
            sh(pns, "ip", "route", "add", "default", "dev", "eth0", "scope", "link")
        # node-a: count what comes back from the VIP or the backend (a reply through the LB node).
        # The client's is a control (its flows to the VIP are redirected at tc ingress, before netfilter: a
        # ping shows the counters count).
        for src in (VIP, POD_B, CLIENT, VIP_SPREAD, POD_C):
            sh(self.ns["a"], "iptables", "-t", "raw", "-A", "PREROUTING", "-s", src, "-j", "ACCEPT")

    def config(self, node: str, pod: tuple[str, str] | None) -> config.NodeConfig:
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
        """
        if pod:
            text += f"""
            [[endpoints]]
            name = "{pod[0]}"
            ifname = "lxc-{pod[0]}"
            ipv4 = "{pod[1]}"
            identity = 3096
            """
        if node == "a":
            for proto in ("tcp", "udp"):
                text += f"""
            [[services]]
            name = "lb-{proto}"
            type = "LoadBalancer"
            address = "{VIP}"
            port = 80
            protocol = "{proto}"
            backends = ["{POD_B}:8000,node={NODE_B}"]
            [[services]]
            name = "spread-{proto}"
            type = "LoadBalancer"
            address = "{VIP_SPREAD}"
            port = 80
            protocol = "{proto}"
            backends = ["{POD_B}:8000,node={NODE_B}", "{POD_C}:8000,node={NODE_C}"]
            """
            text += f"""
            [[services]]
            name = "local-tcp"
            type = "LoadBalancer"
            address = "{VIP_LOCAL}"
            port = 80
            protocol = "tcp"
            backends = ["{POD_A}:8000"]
            """
        return config.parse(textwrap.dedent(text))

    def start_servers(self) -> None:
        for pod in ("poda", "podb", "podc"):
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[pod], PY, "-c", SERVER], stdout=subprocess.PIPE,
                                 text=True)
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


@pytest.fixture(scope="module")
def fabric():
    f = Fabric()
    try:
        f.build()
        node_apply.apply(f.config("a", ("poda", POD_A)))
        node_apply.apply(f.config("b", ("podb", POD_B)))
        node_apply.apply(f.config("c", ("podc", POD_C)))
        f.start_servers()
        yield f
    finally:
        f.close()


def ct_records(pin: str) -> list[ct.CtRecord]:
    out = []
    for name in abi.CT_MAPS:
        with paths.open_pinned(pin, name) as m:
            out.extend(ct.records(m))
    return out


def nat_entries(pin: str) -> dict[tuple, tuple[str, int]]:
    out = {}
    with paths.open_pinned(pin, NAT_MAP) as m:
        for k, v in m.items():
            t = CtTuple4.from_buffer_copy(k)
            e = Nat4Entry.from_buffer_copy(v)
            key = (be32_to_ip(t.saddr), socket.ntohs(t.sport), be32_to_ip(t.daddr), socket.ntohs(t.dport), t.nexthdr)
            out[key] = (be32_to_ip(e.to_addr), socket.ntohs(e.to_port))
    return out


def raw_counts(ns: str) -> dict[str, int]:
    """Packets node-a's raw PREROUTING counted, by source address."""
    res = sh(ns, "iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x")
    out = {}
    for line in res.stdout.splitlines()[2:]:
        cols = line.split()
        if cols:
            out[cols[-2]] = int(cols[0])
    return out


def reasons(pin: str, direction: str = "netdev_ingress") -> dict[str, int]:
    """Verdict counters of one metric direction (cil_from_overlay counts as netdev_ingress too)."""
    obj = str(paths.object_dir() / abi.OBJ_OVERLAY)
    out: dict[str, int] = {}
    with paths.open_pinned(pin, abi.METRICS_MAP) as m:
        for c in metrics.read(m, metrics.reason_names(obj), metrics.direction_names(obj)):
            if c.direction == direction:
                out[c.reason] = out.get(c.reason, 0) + c.packets
    return out


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
    before = raw_counts(f.ns["a"])
    untracked = reasons(f.pin["a"]).get("PASS_NETDEV_UNTRACKED", 0)
    cl = subprocess.Popen(["ip", "netns", "exec", f.ns["client"], PY, "-c", CLIENT_TCP, VIP],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    f.procs.append(cl)
    assert cl.stdout is not None and cl.stdin is not None
    sport, peer, pport = cl.stdout.readline().split()
    sport = int(sport)
    assert (peer, int(pport)) == (VIP, 80)    # the client's socket talks to VIP:80: replies came from there
    assert cl.stdout.readline().strip() == "hello"

    # While the connection lives: SVC on node-a; IN FromTunnel and OUT DSRInternal on node-b; the NAT entry.
    a = ct_records(f.pin["a"])
    svc = [r for r in a if r.proto == "TCP" and r.direction == "SVC" and r.src == (CLIENT, sport)]
    assert len(svc) == 1 and svc[0].dst == (VIP, 80), [r.line() for r in a]
    assert svc[0].entry.backend_id and svc[0].entry.rev_nat_index
    assert not [r for r in a if r.direction in ("IN", "OUT") and r.src == (CLIENT, sport)], [r.line() for r in a]
    b = ct_records(f.pin["b"])
    mine = [r for r in b if r.src == (CLIENT, sport)]
    by = {(r.proto, r.direction, r.related): r for r in mine}
    assert set(by) == {("TCP", "IN", False), ("TCP", "OUT", False)}, [r.line() for r in b]
    for r in mine:
        assert r.dst == (POD_B, 8000)
    assert "FromTunnel" in by["TCP", "IN", False].entry.flag_names
    assert "DSRInternal" not in by["TCP", "IN", False].entry.flag_names
    out = by["TCP", "OUT", False]
    assert "DSRInternal" in out.entry.flag_names and "FromTunnel" not in out.entry.flag_names
    assert out.entry.src_sec_id == 2
    nat = nat_entries(f.pin["b"])
    assert nat.get((POD_B, 8000, CLIENT, sport, 6)) == (VIP, 80), nat   # the reply's tuple
    assert not ct_records(f.pin["c"])

    cl.stdin.write("\n")
    cl.stdin.flush()
    assert cl.stdout.readline().strip() == "again"
    assert cl.wait(timeout=10) == 0
    time.sleep(0.5)

    # The replies never passed node-a; the client's packets did.
    after = raw_counts(f.ns["a"])
    assert after[VIP] == after[POD_B] == 0, after
    red = reasons(f.pin["a"])
    assert red.get("PASS_DSR_REDIRECT", 0) >= 5, red   # SYN, ACK, 2 data, FIN, ACK...
    # Nothing but the client's flow entered node-a's NIC meanwhile: no reply came back through it.
    assert red.get("PASS_NETDEV_UNTRACKED", 0) == untracked, red
    sh(f.ns["client"], "ping", "-c", "1", "-W", "2", NODE_A)
    assert raw_counts(f.ns["a"])[CLIENT] - before[CLIENT] >= 1
    b = ct_records(f.pin["b"])
    lines = {(r.direction, r.related): r.line() for r in b if r.src == (CLIENT, sport) and r.proto == "TCP"}
    assert "[ RxClosing TxClosing SeenNonSyn FromTunnel ]" in lines["IN", False], lines
    assert "[ RxClosing TxClosing SeenNonSyn DSRInternal ]" in lines["OUT", False], lines
    for line in lines.values():   # as the seed's node B: FIN|SYN|PSH|ACK both ways
        assert "RxFlagsSeen=0x1b" in line and "TxFlagsSeen=0x1b" in line, line
        assert "Flags=0x0413" in line or "Flags=0x0093" in line, line
    icmp = [r for r in b if r.proto == "ICMP" and r.src[0] == CLIENT]
    assert len(icmp) == 1 and icmp[0].direction == "IN" and icmp[0].related, [r.line() for r in b]
    assert "FromTunnel" in icmp[0].entry.flag_names
    a = ct_records(f.pin["a"])
    svc = [r for r in a if r.proto == "TCP" and r.direction == "SVC" and r.src == (CLIENT, sport)]
    assert "[ RxClosing TxClosing SeenNonSyn ]" in svc[0].line(), svc[0].line()


CLIENT_UDP = textwrap.dedent("""
    import socket, sys
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5); u.bind(("0.0.0.0", 40123))
    for msg in (b"one", b"two"):
        u.sendto(msg, (sys.argv[1], 80))
        d, a = u.recvfrom(100)
        print(d.decode(), a[0], a[1], flush=True)
""")


def test_udp_dsr(fabric: Fabric) -> None:
    f = fabric
    res = sh(f.ns["client"], PY, "-c", CLIENT_UDP, VIP)
    assert res.stdout.split("\n")[:2] == [f"one {VIP} 80", f"two {VIP} 80"], res.stdout
    b = ct_records(f.pin["b"])
    mine = {(r.proto, r.direction): r for r in b if r.src == (CLIENT, 40123)}
    assert set(mine) == {("UDP", "IN"), ("UDP", "OUT")}, [r.line() for r in b]
    assert "FromTunnel" in mine["UDP", "IN"].entry.flag_names
    assert "DSRInternal" in mine["UDP", "OUT"].entry.flag_names
    assert nat_entries(f.pin["b"]).get((POD_B, 8000, CLIENT, 40123, 17)) == (VIP, 80)
    a = ct_records(f.pin["a"])
    assert [r.direction for r in a if r.src == (CLIENT, 40123)] == ["SVC"]
    counts = raw_counts(f.ns["a"])
    assert counts[VIP] == counts[POD_B] == 0, counts


def _geneve_frame(opts: bytes, sport: int) -> bytes:
    """A Geneve payload (no outer headers: sent on a UDP socket to port 6081) carrying an Ethernet
    frame with UDP CLIENT:sport -> POD_B:8000."""
    payload = b"bad"
    udp = struct.pack("!HHHH", sport, 8000, 8 + len(payload), 0) + payload
    ip_hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(CLIENT), socket.inet_aton(POD_B))
    csum = 0
    for i in range(0, 20, 2):
        csum += (ip_hdr[i] << 8) | ip_hdr[i + 1]
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    ip_hdr = ip_hdr[:10] + struct.pack("!H", csum) + ip_hdr[12:]
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    critical = any(opts[i + 2] & 0x80 for i in range(0, len(opts), 4) if i + 2 < len(opts)) if opts else False
    gnv = struct.pack("!BBHI", len(opts) // 4, 0x40 if critical else 0, 0x6558, 0)
    return gnv + opts + eth + ip_hdr + udp


def _opt(cls: int, typ: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HBB", cls, typ, len(body) // 4 if length is None else length) + body


GOOD_BODY = socket.inet_aton(VIP) + struct.pack("!HH", 80, 0)

BAD_OPTIONS = {
    "DSR_OPT_MALFORMED": _opt(0x014B, 0x81, GOOD_BODY, length=1),
    "DSR_OPT_CRITICAL": _opt(0x0102, 0x85, GOOD_BODY),
    "DSR_OPT_NOT_ALONE": _opt(0x014B, 0x81, GOOD_BODY) + _opt(0x0102, 0x01, b""),
}


def test_bad_geneve_options_dropped_with_reason(fabric: Fabric) -> None:
    f = fabric
    nat_before = nat_entries(f.pin["b"])
    before = reasons(f.pin["b"])
    script = textwrap.dedent("""
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 6081))
    """)
    for i, (reason, opts) in enumerate(BAD_OPTIONS.items()):
        sh(f.ns["client"], PY, "-c", script, _geneve_frame(opts, 41000 + i).hex(), NODE_B)
    time.sleep(0.5)
    after = reasons(f.pin["b"])
    for reason in BAD_OPTIONS:
        assert after.get(f"DROP_{reason}", 0) - before.get(f"DROP_{reason}", 0) == 1, (reason, after)
    b = ct_records(f.pin["b"])
    assert not [r for r in b if r.src[0] == CLIENT and 41000 <= r.src[1] < 41010], [r.line() for r in b]
    assert nat_entries(f.pin["b"]) == nat_before


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


def _dsr_flows(pin: str, pod: str, proto: str, sports: set[int]) -> dict[int, dict[str, ct.CtRecord]]:
    """The client's flows to ``pod`` on one backend node, by source port: direction -> record."""
    out: dict[int, dict[str, ct.CtRecord]] = {}
    for r in ct_records(pin):
        if r.proto == proto and not r.related and r.src[0] == CLIENT and r.src[1] in sports:
            assert r.dst == (pod, 8000), r.line()
            out.setdefault(r.src[1], {})[r.direction] = r
    return out


def test_tcp_many_connections_spread_over_two_backend_nodes(fabric: Fabric) -> None:
    f = fabric
    before = raw_counts(f.ns["a"])
    untracked = reasons(f.pin["a"]).get("PASS_NETDEV_UNTRACKED", 0)
    cl = subprocess.Popen(["ip", "netns", "exec", f.ns["client"], PY, "-c", CLIENT_MANY, VIP_SPREAD, str(N_TCP)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    f.procs.append(cl)
    assert cl.stdout is not None and cl.stdin is not None
    lines = [cl.stdout.readline().split() for _ in range(N_TCP)]
    assert cl.stdout.readline().strip() == "done", lines
    sports = {int(sp) for sp, *_ in lines}
    assert len(sports) == N_TCP
    for i, (_, peer, pport, echo) in enumerate(lines):   # every connection: VIP:80, its own request echoed
        assert (peer, int(pport), echo) == (VIP_SPREAD, 80, f"req{i}"), lines[i]

    # Each connection on exactly one backend node, with its DSRInternal/FromTunnel pair and its NAT entry.
    flows = {"b": _dsr_flows(f.pin["b"], POD_B, "TCP", sports), "c": _dsr_flows(f.pin["c"], POD_C, "TCP", sports)}
    per_backend = {n: len(v) for n, v in flows.items()}
    assert set(flows["b"]).isdisjoint(flows["c"]) and sum(per_backend.values()) == N_TCP, per_backend
    assert per_backend["b"] > 0 and per_backend["c"] > 0, per_backend
    for n, pod in (("b", POD_B), ("c", POD_C)):
        nat = nat_entries(f.pin[n])
        for sport, by in flows[n].items():
            assert set(by) == {"IN", "OUT"}, {d: r.line() for d, r in by.items()}
            assert "DSRInternal" in by["OUT"].entry.flag_names and "FromTunnel" in by["IN"].entry.flag_names
            assert nat.get((pod, 8000, CLIENT, sport, 6)) == (VIP_SPREAD, 80), (n, sport)
    # node-a: one SVC entry per connection, its backend the one whose node has the flow.
    svc = {r.src[1]: r for r in ct_records(f.pin["a"])
           if r.proto == "TCP" and r.direction == "SVC" and r.src[0] == CLIENT and r.src[1] in sports}
    assert set(svc) == sports and all(r.dst == (VIP_SPREAD, 80) for r in svc.values())
    ids = {n: {svc[sp].entry.backend_id for sp in flows[n]} for n in flows}
    assert len(ids["b"]) == len(ids["c"]) == 1 and ids["b"] != ids["c"], ids

    cl.stdin.write("\n")
    cl.stdin.flush()
    assert cl.stdout.readline().strip() == "closed"
    assert cl.wait(timeout=20) == 0
    time.sleep(0.5)
    after = raw_counts(f.ns["a"])
    for src in (VIP_SPREAD, POD_B, POD_C):   # no reply passed node-a
        assert after[src] == before[src] == 0, after
    red = reasons(f.pin["a"])
    assert red.get("PASS_NETDEV_UNTRACKED", 0) == untracked, red
    print(f"tcp connections per backend node: {per_backend}")


CLIENT_UDP_MANY = textwrap.dedent("""
    import socket, sys
    vip, base, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5); u.bind(("0.0.0.0", base + i))
        u.sendto(b"u%d" % i, (vip, 80))
        d, a = u.recvfrom(100)
        print(base + i, a[0], a[1], d.decode(), flush=True)
        u.close()
""")


def test_udp_spread_over_two_backend_nodes(fabric: Fabric) -> None:
    f = fabric
    base, n = 40200, 24
    res = sh(f.ns["client"], PY, "-c", CLIENT_UDP_MANY, VIP_SPREAD, str(base), str(n))
    got = [line.split() for line in res.stdout.splitlines()]
    assert got == [[str(base + i), VIP_SPREAD, "80", f"u{i}"] for i in range(n)], res.stdout
    sports = set(range(base, base + n))
    flows = {"b": _dsr_flows(f.pin["b"], POD_B, "UDP", sports), "c": _dsr_flows(f.pin["c"], POD_C, "UDP", sports)}
    per_backend = {k: len(v) for k, v in flows.items()}
    assert set(flows["b"]).isdisjoint(flows["c"]) and sum(per_backend.values()) == n, per_backend
    assert per_backend["b"] > 0 and per_backend["c"] > 0, per_backend
    for k, pod in (("b", POD_B), ("c", POD_C)):
        nat = nat_entries(f.pin[k])
        for sport, by in flows[k].items():
            assert set(by) == {"IN", "OUT"} and "DSRInternal" in by["OUT"].entry.flag_names
            assert nat.get((pod, 8000, CLIENT, sport, 17)) == (VIP_SPREAD, 80)
    counts = raw_counts(f.ns["a"])
    assert counts[VIP_SPREAD] == counts[POD_B] == counts[POD_C] == 0, counts
    print(f"udp flows per backend node: {per_backend}")


def test_local_backend_on_the_lb_node(fabric: Fabric) -> None:
    f = fabric
    redirects = reasons(f.pin["a"]).get("PASS_DSR_REDIRECT", 0)
    cl = subprocess.Popen(["ip", "netns", "exec", f.ns["client"], PY, "-c", CLIENT_TCP, VIP_LOCAL],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    f.procs.append(cl)
    assert cl.stdout is not None and cl.stdin is not None
    sport, peer, pport = cl.stdout.readline().split()
    sport = int(sport)
    assert (peer, int(pport)) == (VIP_LOCAL, 80)
    assert cl.stdout.readline().strip() == "hello"
    # As a local NodePort/LB backend: SVC client -> VIP:80; OUT client -> pod with NodePort, the service's
    # RevNAT and the NIC's ifindex (the reply's rev-NAT on the way out); the pod's IN entry and its related
    # ICMP twin; nothing of DSR.
    eth0 = json.loads(sh(f.ns["a"], "ip", "-j", "link", "show", "eth0").stdout)[0]["ifindex"]
    a = ct_records(f.pin["a"])
    mine = {(r.proto, r.direction, r.related): r for r in a if r.src[0] == CLIENT and r.src[1] in (sport, 0)
            and r.dst[0] in (VIP_LOCAL, POD_A)}
    lines = [r.line() for r in mine.values()]
    assert set(mine) == {("TCP", "SVC", False), ("TCP", "OUT", False), ("TCP", "IN", False),
                         ("ICMP", "IN", True)}, lines
    svc, out, inn = mine["TCP", "SVC", False], mine["TCP", "OUT", False], mine["TCP", "IN", False]
    assert svc.dst == (VIP_LOCAL, 80) and svc.entry.backend_id and svc.entry.rev_nat_index, lines
    assert out.dst == inn.dst == (POD_A, 8000), lines
    assert "NodePort" in out.entry.flag_names and out.entry.rev_nat_index == svc.entry.rev_nat_index, lines
    assert out.entry.ifindex == eth0, lines
    assert inn.entry.rev_nat_index == 0 and "NodePort" not in inn.entry.flag_names, lines
    for r in mine.values():
        assert not {"DSRInternal", "FromTunnel"} & set(r.entry.flag_names), r.line()
    cl.stdin.write("\n")
    cl.stdin.flush()
    assert cl.stdout.readline().strip() == "again"
    assert cl.wait(timeout=10) == 0
    assert reasons(f.pin["a"]).get("PASS_DSR_REDIRECT", 0) == redirects   # no Geneve for a local backend
    for n in ("b", "c"):
        assert not [r for r in ct_records(f.pin[n]) if r.src == (CLIENT, sport)]


def test_nat_entry_lives_with_the_connection_and_goes_with_gc(fabric: Fabric) -> None:
    f = fabric
    cl = subprocess.Popen(["ip", "netns", "exec", f.ns["client"], PY, "-c", CLIENT_TCP, VIP],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    f.procs.append(cl)
    assert cl.stdout is not None and cl.stdin is not None
    sport = int(cl.stdout.readline().split()[0])
    assert cl.stdout.readline().strip() == "hello"
    key = (POD_B, 8000, CLIENT, sport, 6)

    def mine() -> list[ct.CtRecord]:
        return [r for r in ct_records(f.pin["b"]) if r.src == (CLIENT, sport)]

    with contextlib.ExitStack() as st:
        maps = [st.enter_context(paths.open_pinned(f.pin["b"], name)) for name in abi.CT_MAPS]
        nat = st.enter_context(paths.open_pinned(f.pin["b"], NAT_MAP))
        with CtGc(maps, nat=nat) as g:
            # A pass now, while the connection lives: the entries and the NAT entry stay.
            g.run()
            assert len(mine()) == 2 and nat_entries(f.pin["b"]).get(key) == (VIP, 80)
            cl.stdin.write("\n")
            cl.stdin.flush()
            assert cl.stdout.readline().strip() == "again"
            assert cl.wait(timeout=10) == 0
            time.sleep(0.5)
            closed = mine()
            assert len(closed) == 2 and all("RxClosing" in r.entry.flag_names for r in closed)
            assert nat_entries(f.pin["b"]).get(key) == (VIP, 80)   # closed, not expired yet
            g.run()
            assert len(mine()) == 2 and nat_entries(f.pin["b"]).get(key) == (VIP, 80)
            # Past the closing timeout (the datapath's clock is CLOCK_MONOTONIC seconds, no offset on
            # pinned objects): a pass deletes both entries and the NAT entry the DSRInternal one owns.
            last = max(r.entry.lifetime for r in closed)
            res = g.run(now=last + 1)
    assert res.nat_deleted >= 1, res
    assert not mine(), [r.line() for r in mine()]
    assert key not in nat_entries(f.pin["b"])
