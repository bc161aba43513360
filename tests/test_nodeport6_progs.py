"""NodePort / LoadBalancer over IPv6 on the node's NIC and DSR over Geneve for IPv6 services, through the real
programs (BPF_PROG_TEST_RUN, crafted frames, checksums recomputed by scapy).

The LB node: DNAT to a local backend with the NodePort CT_EGRESS entry and the reply's reverse NAT; a remote
backend's flow tunnel-keyed (IPv6 underlay, or IPv4 for a node stored IPv4-mapped) and redirected to the
overlay. The backend node: cil_from_overlay reads the Geneve option from the tunnel metadata that
tests/bpf/tunnel_inject.bpf.c sets before tail-calling it (what the kernel's Geneve receive path leaves on
the packet; test_run alone gives none), creates the DSRInternal CT_EGRESS entry and the NAT6 entry, and the
reply leaves cil_to_netdev from the service address. Malformed options are counted drops.
"""
from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import Iterator

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from lb_harness import LbHarness, checksums_ok, cli_service, ip_of, l4_of, load_on_maps, pinned_maps
from lxc_harness import MAC_A, MAC_B, TC_ACT_OK, TC_ACT_SHOT, tcp, udp
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.datapath import abi
from tuplet.datapath.abi import OBJ_OVERLAY, TUPLE_F_IN, TUPLE_F_OUT, TUPLE_F_SERVICE
from tuplet.datapath.layouts import CtTuple6, Nat6Entry, bytes_to_ip6
from tuplet.datapath.paths import object_dir
from tuplet.lb import writer as lb
from tuplet.lb.model import ServiceType

pytestmark = pytest.mark.clock   # again with a near-zero clock in `make test`

CLIENT = "2001:db8:191::1"
VIP, NODE_IP = "2001:db8:190::17", "2001:db8:50::2"      # LoadBalancer VIP; the node's own address (NodePort)
POD = "2001:db8:64::39"                                   # a local backend
REMOTE = "2001:db8:65::9"                                 # a backend on another node
NODE6, NODE4 = "2001:db8:7::2", "192.168.7.2"             # that node over an IPv6 / IPv4 underlay
BP = 8000
TCP_P, UDP_P = 6, 17
TC_ACT_REDIRECT = 7
OVERLAY = {"overlay_ifindex": 1}   # a node with [overlay] (ifindex 1 stands in for the Geneve device)


@pytest.fixture
def node(pin_root, request) -> Iterator[tuple[LbHarness, str]]:
    """Pod-side and NIC-side objects on shared pinned maps, POD a local endpoint; with an overlay when
    the test is marked so (``@pytest.mark.parametrize("node", [OVERLAY], indirect=True)``)."""
    h = LbHarness.load_both(consts=getattr(request, "param", None))
    h.add_endpoint(POD, 4002)
    with pinned_maps(h, pin_root, (*abi.LB_MAPS, abi.EXTERNAL_MAP)):
        yield h, pin_root


def write(root: str, *backends: str, address: str = VIP, port: int = 80, proto: str = "tcp",
          type: ServiceType = ServiceType.LOAD_BALANCER, name: str = "lb6", m: int = 251) -> lb.ServiceView:
    with lb.ServiceTable(root, local_addrs={POD}) as t:
        return t.upsert(cli_service(address, port, *backends, name=name, m=m, type=type, protocol=proto))


def frame(proto: str, src: str, sport: int, dst: str, dport: int, flags: str = "S", payload: bytes = b"hi") -> bytes:
    return tcp(src, sport, dst, dport, flags, payload) if proto == "tcp" else udp(src, sport, dst, dport, payload)


# --- the LB node: local backends -----------------------------------------------------------------------------

@pytest.mark.parametrize("proto,svc_type,address,port", [
    ("tcp", ServiceType.LOAD_BALANCER, VIP, 80), ("udp", ServiceType.LOAD_BALANCER, VIP, 53),
    ("tcp", ServiceType.NODE_PORT, NODE_IP, 30080), ("udp", ServiceType.NODE_PORT, NODE_IP, 30053),
])
def test_dnat_nodeport_entry_and_reverse_nat(node, proto, svc_type, address, port) -> None:
    h, root = node
    v = write(root, f"[{POD}]:{BP}", address=address, port=port, proto=proto, type=svc_type)
    nh = TCP_P if proto == "tcp" else UDP_P
    verdict, out = h.run_out("cil_from_netdev", frame(proto, CLIENT, 53438, address, port, payload=b"hello"))
    assert (verdict.retval, verdict.reason) == (TC_ACT_OK, "PASS_CT_NEW")
    assert l4_of(out) == (CLIENT, 53438, POD, BP) and checksums_ok(out), ip_of(out).show(dump=True)
    assert bytes(ip_of(out)[TCP if proto == "tcp" else UDP].payload) == b"hello"
    # CT_SERVICE (client to the service address) and the NodePort CT_EGRESS entry, in the IPv6 tables.
    svc_e = h.entry(CLIENT, address, port, 53438, nh, TUPLE_F_SERVICE)
    assert svc_e is not None and svc_e.rev_nat_index == v.rev_nat
    out_e = h.entry(CLIENT, POD, BP, 53438, nh, TUPLE_F_OUT)
    assert out_e is not None and out_e.node_port == 1 and out_e.rev_nat_index == v.rev_nat
    assert "NodePort" in out_e.flag_names and out_e.ifindex != 0 and out_e.src_sec_id == abi.TPL_IDENTITY_WORLD
    h.run_out("cil_to_container", out)
    # The reply leaves the node from the service address, checksum right.
    reply = frame(proto, POD, BP, CLIENT, 53438, "SA", b"world")
    h.run_out("cil_from_container", reply)
    verdict, back = h.run_out("cil_to_netdev", reply)
    assert (verdict.retval, verdict.reason) == (TC_ACT_OK, "PASS_CT_REPLY")
    assert l4_of(back) == (address, port, CLIENT, 53438) and checksums_ok(back), ip_of(back).show(dump=True)
    assert bytes(ip_of(back)[TCP if proto == "tcp" else UDP].payload) == b"world"
    verdict, out = h.run_out("cil_from_netdev", frame(proto, CLIENT, 53438, address, port, "A"))
    assert verdict.reason == "PASS_CT_ESTABLISHED" and l4_of(out)[2] == POD


def test_extension_headers_are_walked(node) -> None:
    """A destination-options header between IPv6 and TCP: DNAT and the checksum still right."""
    h, root = node
    write(root, f"[{POD}]:{BP}")
    pkt = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src=CLIENT, dst=VIP) / IPv6ExtHdrDestOpt() /
                TCP(sport=40000, dport=80, flags="S") / Raw(b"x"))
    verdict, out = h.run_out("cil_from_netdev", pkt)
    assert verdict.reason == "PASS_CT_NEW" and l4_of(out) == (CLIENT, 40000, POD, BP) and checksums_ok(out)


def test_ipv6_that_is_not_a_service_flow_passes_untouched(node) -> None:
    h, root = node
    write(root, f"[{POD}]:{BP}")                                         # NIC-reachable: cil_to_netdev probes
    write(root, f"[{POD}]:{BP}", address="2001:db8:68::a", name="cip", type=ServiceType.CLUSTER_IP)
    eth = Ether(src=MAC_A, dst=MAC_B)
    cases = {
        "neighbour solicitation": eth / IPv6(src=CLIENT, dst="ff02::1:ff00:17", hlim=255) / ICMPv6ND_NS(tgt=VIP),
        "router advertisement": eth / IPv6(src="fe80::1", dst="ff02::1", hlim=255) / ICMPv6ND_RA(),
        "echo to the VIP": eth / IPv6(src=CLIENT, dst=VIP) / ICMPv6EchoRequest(id=7),
        "other port of the VIP": eth / IPv6(src=CLIENT, dst=VIP) / TCP(sport=1000, dport=81, flags="S"),
        "ClusterIP from outside": eth / IPv6(src=CLIENT, dst="2001:db8:68::a") / UDP(sport=1000, dport=80),
        "to a pod": eth / IPv6(src=CLIENT, dst=POD) / TCP(sport=1000, dport=22, flags="S"),
    }
    for prog in ("cil_from_netdev", "cil_to_netdev"):
        for what, p in cases.items():
            pkt = bytes(p)
            verdict, out = h.run_out(prog, pkt)
            assert (verdict.retval, verdict.reason) == (TC_ACT_OK, "PASS_NETDEV_UNTRACKED"), (prog, what, verdict)
            assert out == pkt, (prog, what)
    assert h.entries6() == []


def test_remote_ipv6_backend_without_overlay_is_a_counted_drop(node) -> None:
    h, root = node
    write(root, f"[{REMOTE}]:{BP},node={NODE6}")
    verdict, _ = h.run_out("cil_from_netdev", tcp(CLIENT, 53438, VIP, 80, "S"))
    assert (verdict.retval, verdict.reason) == (TC_ACT_SHOT, "DROP_REMOTE_BACKEND")
    assert h.entries6() == []


def test_maglev_picks_the_same_ipv6_backend_on_every_node(pin_root) -> None:
    backends = [f"[2001:db8:64::{i:x}]:{BP}" for i in range(0x60, 0x65)]
    picks = []
    for n in range(2):                                   # two nodes, the same service, the same flows
        h = LbHarness.load_both()
        root = f"{pin_root}/n{n}"
        with pinned_maps(h, root, (*abi.LB_MAPS, abi.EXTERNAL_MAP)):
            with lb.ServiceTable(root, local_addrs={b[1:].split("]")[0] for b in backends}) as t:
                t.upsert(cli_service(VIP, 80, *backends, name="lb6", m=1021, type=ServiceType.LOAD_BALANCER))
            picks.append([l4_of(h.run_out("cil_from_netdev", tcp(f"2001:db8:191::{i + 1:x}", 1024 + i, VIP, 80,
                                                                 "S"))[1])[2] for i in range(500)])
    assert picks[0] == picks[1]
    counts = Counter(picks[0])
    assert len(counts) == 5 and all(50 <= c <= 150 for c in counts.values()), counts   # 100 expected each


# --- the LB node: remote backends over DSR ----------------------------------------------------------------------

@pytest.mark.parametrize("node", [OVERLAY], indirect=True)
@pytest.mark.parametrize("underlay", [NODE6, NODE4])
def test_lb_node_tunnels_remote_ipv6_backend(node, underlay) -> None:
    """DNAT to the remote backend, tunnel key to its node (IPv6, or IPv4 stored IPv4-mapped), redirect
    (TC_ACT_REDIRECT); the LB node keeps the CT_SERVICE entry only. Without node= there is nowhere to go."""
    h, root = node
    write(root, f"[{REMOTE}]:{BP}")
    verdict, _ = h.run_out("cil_from_netdev", tcp(CLIENT, 53437, VIP, 80, "S"))
    assert (verdict.retval, verdict.reason) == (TC_ACT_SHOT, "DROP_REMOTE_BACKEND")
    h.coll.maps[abi.CT6_MAP_SYN].clear()
    write(root, f"[{REMOTE}]:{BP},node={underlay}")
    for flags in ("S", "A", "PA"):   # the option rides on the SYN; the key and redirect on every packet
        verdict, out = h.run_out("cil_from_netdev", tcp(CLIENT, 53438, VIP, 80, flags))
        assert (verdict.retval, verdict.reason) == (TC_ACT_REDIRECT, "PASS_DSR_REDIRECT")
        assert l4_of(out) == (CLIENT, 53438, REMOTE, BP) and checksums_ok(out)
    recs = h.entries6()
    assert [(r.proto, r.direction, r.src, r.dst) for r in recs] == [("TCP", "SVC", (CLIENT, 53438), (VIP, 80))]
    write(root, f"[{REMOTE}]:{BP},node={underlay}", port=53, proto="udp", name="dns6")
    for _ in range(2):               # UDP: the option on every packet
        verdict, out = h.run_out("cil_from_netdev", udp(CLIENT, 5000, VIP, 53))
        assert (verdict.retval, verdict.reason) == (TC_ACT_REDIRECT, "PASS_DSR_REDIRECT")
        assert l4_of(out) == (CLIENT, 5000, REMOTE, BP) and checksums_ok(out)
    assert sorted(r.direction for r in h.entries6()) == ["SVC", "SVC"]


# --- the backend node ---------------------------------------------------------------------------------------------

def geneve_opt(body: bytes, cls: int = abi.DSR_OPT_CLASS, typ: int = abi.DSR_OPT_TYPE,
               length: int | None = None) -> bytes:
    return struct.pack("!HBB", cls, typ, len(body) // 4 if length is None else length) + body


def dsr_opt6(address: str = VIP, port: int = 80) -> bytes:
    return geneve_opt(socket.inet_pton(socket.AF_INET6, address) + struct.pack("!HH", port, 0))


def dsr_opt4(address: str = "172.190.0.17", port: int = 80) -> bytes:
    return geneve_opt(socket.inet_aton(address) + struct.pack("!HH", port, 0))


class BackendNode:
    """cil_from_overlay (and cil_to_container, behind a mark) reached through tunnel_inject."""

    def __init__(self, h: LbHarness) -> None:
        self.h = h
        self.overlay = load_on_maps(h.coll, OBJ_OVERLAY, {"ct_accounting": 0, **OVERLAY})
        with ObjectSpec.open(object_dir() / "tunnel_inject.o") as spec:
            self.inject: Collection = spec.load()
        nxt = self.inject.maps["inject_next"]
        nxt.update(0, self.overlay.programs["cil_from_overlay"].fd.to_bytes(4, "little"))
        nxt.update(1, h.coll.programs["cil_to_container"].fd.to_bytes(4, "little"))

    def close(self) -> None:
        self.inject.close()
        self.overlay.close()

    def _cfg(self, underlay: str, opts: bytes, mark: int = 0) -> None:
        v6 = ":" in underlay
        remote4 = 0 if v6 else int.from_bytes(socket.inet_aton(underlay), "big")
        remote6 = socket.inet_pton(socket.AF_INET6, underlay) if v6 else bytes(16)
        self.inject.maps["inject_cfg"].update(0, struct.pack("<I16sIII32s", remote4, remote6, int(v6), len(opts),
                                                             mark, opts))

    def receive(self, pkt: bytes, opts: bytes, underlay: str = NODE6):
        """The frame as decapsulated from a Geneve packet from underlay carrying opts: through
        cil_from_overlay. (verdict, frame)."""
        self._cfg(underlay, opts)
        return self.h.run_program(self.inject.programs["tunnel_inject"], pkt)

    def to_pod(self, pkt: bytes, mark: int):
        """The frame into the pod's veth (cil_to_container) with the mark cil_from_overlay left."""
        self._cfg(NODE6, b"", mark)
        return self.h.run_program(self.inject.programs["mark_inject"], pkt)


@pytest.fixture
def backend_node(node) -> Iterator[BackendNode]:
    b = BackendNode(node[0])
    yield b
    b.close()


@pytest.mark.parametrize("node", [OVERLAY], indirect=True)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("underlay", [NODE6, NODE4])
def test_backend_node_entries_and_the_reply_from_the_service_address(node, backend_node, proto, underlay) -> None:
    h = node[0]
    nh = TCP_P if proto == "tcp" else UDP_P
    first = frame(proto, CLIENT, 53438, POD, BP, "S", b"hello")    # DNATed by the LB node
    verdict, out = backend_node.receive(first, dsr_opt6(VIP, 80), underlay)
    assert (verdict.retval, verdict.reason) == (TC_ACT_OK, "PASS_CT_NEW") and out == first
    # The DSRInternal CT_EGRESS entry in the IPv6 table, and its NAT6 entry (nat_key_for_ct: the reply on the wire).
    e = h.entry(CLIENT, POD, BP, 53438, nh, TUPLE_F_OUT)
    assert e is not None and e.dsr_internal and "DSRInternal" in e.flag_names and not e.node_port
    assert e.src_sec_id == abi.TPL_IDENTITY_WORLD
    raw = h.coll.maps[abi.NAT6_MAP].lookup(CtTuple6.make(CLIENT, POD, 53438, BP, nh, TUPLE_F_OUT))
    assert raw is not None
    nat = Nat6Entry.from_buffer_copy(raw)
    assert (bytes_to_ip6(nat.to_addr), socket.ntohs(nat.to_port)) == (VIP, 80) and nat.created
    assert list(h.coll.maps[abi.NAT_MAP].keys()) == []
    # The pod's veth: the CT_INGRESS entry has FromTunnel (the mark cil_from_overlay set).
    verdict, _ = backend_node.to_pod(first, abi.TPL_MARK_FROM_TUNNEL)
    assert verdict.reason == "PASS_CT_NEW"
    ing = h.entry(CLIENT, POD, BP, 53438, nh, TUPLE_F_IN)
    assert ing is not None and ing.from_tunnel and "FromTunnel" in ing.flag_names
    # The reply: out of the pod, then out of the node's NIC from VIP:80, straight to the client.
    reply = frame(proto, POD, BP, CLIENT, 53438, "SA", b"world")
    h.run_out("cil_from_container", reply)
    verdict, back = h.run_out("cil_to_netdev", reply)
    assert (verdict.retval, verdict.reason) == (TC_ACT_OK, "PASS_CT_REPLY")
    assert l4_of(back) == (VIP, 80, CLIENT, 53438) and checksums_ok(back), ip_of(back).show(dump=True)
    # Later packets (no option on TCP) refresh the entry.
    verdict, _ = backend_node.receive(frame(proto, CLIENT, 53438, POD, BP, "A"), b"" if proto == "tcp"
                                      else dsr_opt6(VIP, 80), underlay)
    assert verdict.reason == "PASS_CT_ESTABLISHED"
    # Without its NAT entry the reply is a counted drop, not a leak of the backend's address.
    h.coll.maps[abi.NAT6_MAP].clear()
    verdict, _ = h.run_out("cil_to_netdev", frame(proto, POD, BP, CLIENT, 53438, "A"))
    assert (verdict.retval, verdict.reason) == (TC_ACT_SHOT, "DROP_REV_NAT_MISSING")


@pytest.mark.parametrize("node", [OVERLAY], indirect=True)
def test_ipv4_dsr_still_works_behind_the_generic_body(node, backend_node) -> None:
    h = node[0]
    h.add_endpoint("10.64.1.39", 4003)
    pkt = tcp("172.191.0.1", 40000, "10.64.1.39", BP, "S")
    verdict, _ = backend_node.receive(pkt, dsr_opt4("172.190.0.17", 80), NODE4)
    assert verdict.reason == "PASS_CT_NEW"
    e = h.entry("172.191.0.1", "10.64.1.39", BP, 40000, TCP_P, TUPLE_F_OUT)
    assert e is not None and e.dsr_internal
    verdict, back = h.run_out("cil_to_netdev", tcp("10.64.1.39", BP, "172.191.0.1", 40000, "SA"))
    assert verdict.reason == "PASS_CT_REPLY" and l4_of(back)[:2] == ("172.190.0.17", 80) and checksums_ok(back)


V6_BODY = socket.inet_pton(socket.AF_INET6, VIP) + struct.pack("!HH", 80, 0)
BAD_OPTIONS6 = {
    "short": ("DROP_DSR_OPT_MALFORMED", geneve_opt(V6_BODY[:12], length=abi.DSR_OPT6_LEN)),
    "header only": ("DROP_DSR_OPT_MALFORMED", geneve_opt(b"", length=abi.DSR_OPT6_LEN)),
    "wrong length": ("DROP_DSR_OPT_MALFORMED", geneve_opt(V6_BODY, length=4)),
    "zero address": ("DROP_DSR_OPT_MALFORMED", dsr_opt6("::", 80)),
    "zero port": ("DROP_DSR_OPT_MALFORMED", geneve_opt(V6_BODY[:16] + bytes(4))),
    "IPv4 option": ("DROP_DSR_OPT_MALFORMED", dsr_opt4()),
    "critical unknown": ("DROP_DSR_OPT_CRITICAL", geneve_opt(V6_BODY, cls=0x0102, typ=0x85)),
    "not alone": ("DROP_DSR_OPT_NOT_ALONE", dsr_opt6() + geneve_opt(b"", cls=0x0102, typ=0x01)),
    "behind another option": ("DROP_DSR_OPT_NOT_ALONE", geneve_opt(b"", cls=0x0102, typ=0x01) + dsr_opt6()),
    "unknown ignorable, alone": ("PASS_OVERLAY_UNTRACKED", geneve_opt(bytes(8), cls=0x0102, typ=0x01)),
}


@pytest.mark.parametrize("node", [OVERLAY], indirect=True)
@pytest.mark.parametrize("case", sorted(BAD_OPTIONS6))
def test_malformed_ipv6_options(node, backend_node, case) -> None:
    h = node[0]
    reason, opts = BAD_OPTIONS6[case]
    assert len(opts) <= 32
    verdict, _ = backend_node.receive(udp(CLIENT, 41000, POD, BP, b"bad"), opts)
    assert verdict.reason == reason and (verdict.retval == TC_ACT_SHOT) == reason.startswith("DROP_"), verdict
    assert h.entries6() == [] and list(h.coll.maps[abi.NAT6_MAP].keys()) == []


@pytest.mark.parametrize("node", [OVERLAY], indirect=True)
def test_ipv6_option_on_an_ipv4_packet_is_malformed(node, backend_node) -> None:
    h = node[0]
    verdict, _ = backend_node.receive(udp("172.191.0.1", 41000, "10.64.1.39", BP, b"bad"), dsr_opt6(), NODE4)
    assert (verdict.retval, verdict.reason) == (TC_ACT_SHOT, "DROP_DSR_OPT_MALFORMED")
    assert h.entries() == [] and list(h.coll.maps[abi.NAT_MAP].keys()) == []
