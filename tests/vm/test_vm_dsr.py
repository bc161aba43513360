"""LoadBalancer with Direct Server Return over Geneve across three nodes, in the 6.1 VM (the host kernel has
no geneve module).

    client 192.168.50.1 ─┐
    node-a 192.168.50.10 ├─ bridge (namespace "fab")       VIP 172.190.0.17:80 (tcp, udp) on node-a
    node-b 192.168.50.11 ├─ pod-b 10.64.1.39 (backend)     backends: 10.64.1.39:8000,node=192.168.50.11
    node-c 192.168.50.12 ┘  pod-c 10.64.2.40 (idle)

Each node is a namespace with its own pin root, its NIC ``eth0`` and the overlay device ``tpl_geneve0``
created by ``datapath.apply``. The client reaches the VIP through node-a (its route), node-a forwards over
Geneve to node-b, and the reply leaves node-b from VIP:80 straight to the client: node-a never sees it
(iptables counters in node-a's raw table count packets from the VIP or the backend: zero).
"""
from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tuplet import config, ct, datapath, metrics
from tuplet.bpffs import BPFFS
from tuplet.ct import NAT_MAP
from tuplet.layouts import CtTuple4, Nat4Entry, be32_to_ip

pytestmark = pytest.mark.vm

CLIENT, NODE_A, NODE_B, NODE_C = "192.168.50.1", "192.168.50.10", "192.168.50.11", "192.168.50.12"
POD_B, POD_C = "10.64.1.39", "10.64.2.40"
VIP = "172.190.0.17"
PY = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python")

SERVER = textwrap.dedent("""
    import socket, sys, threading
    def tcp():
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 8000)); s.listen(16)
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
        self.ns = {n: f"tpl-dsr-{n}-{tag}" for n in ("fab", "client", "a", "b", "c", "podb", "podc")}
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
        sh(self.ns["client"], "ip", "route", "add", f"{VIP}/32", "via", NODE_A)
        for node, pod, addr in (("b", "podb", POD_B), ("c", "podc", POD_C)):
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
        for src in (VIP, POD_B, CLIENT):
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
            """
        return config.parse(textwrap.dedent(text))

    def start_server(self) -> None:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns["podb"], PY, "-c", SERVER], stdout=subprocess.PIPE,
                             text=True)
        self.procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for n, pin in self.pin.items():
            with contextlib.suppress(Exception):
                datapath.teardown(pin, self.ns[n])
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def fabric():
    f = Fabric()
    try:
        f.build()
        datapath.apply(f.config("a", None))
        datapath.apply(f.config("b", ("podb", POD_B)))
        datapath.apply(f.config("c", ("podc", POD_C)))
        f.start_server()
        yield f
    finally:
        f.close()


def ct_records(pin: str) -> list[ct.CtRecord]:
    out = []
    for name in ct.CT_MAPS:
        with datapath.open_pinned(pin, name) as m:
            out.extend(ct.records(m))
    return out


def nat_entries(pin: str) -> dict[tuple, tuple[str, int]]:
    out = {}
    with datapath.open_pinned(pin, NAT_MAP) as m:
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
    obj = str(datapath.object_dir() / datapath.OBJ_OVERLAY)
    out: dict[str, int] = {}
    with datapath.open_pinned(pin, datapath.METRICS_MAP) as m:
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
