"""The pod-side programs on crafted IPv6 packets (BPF_PROG_TEST_RUN): verdicts and the IPv6 tables.

The IPv4 twins of these are in test_ct_progs.py; the same harness (lxc_harness) builds IPv6 frames
when given IPv6 addresses and looks keys up in the IPv6 tables.
"""
from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6MLQuery,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Jumbo,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lxc_harness import MAC_A, MAC_B, TC_ACT_OK, TC_ACT_SHOT, LxcHarness, icmp_echo, icmp_error, tcp, udp
from tuplet.datapath import events
from tuplet.datapath.abi import (
    CT6_MAP_ANY,
    CT6_MAP_SYN,
    CT6_MAP_TCP,
    CT6_MAPS,
    CT_MAPS,
    EVENTS_MAP,
    OBJ_LXC,
    SIGNAL_MAP,
    TUPLE_F_IN,
    TUPLE_F_OUT,
    TUPLE_F_RELATED,
)
from tuplet.datapath.clock import diff
from tuplet.datapath.layouts import CtTuple6
from tuplet.datapath.paths import object_dir
from tuplet.datapath.signals import SignalReader

pytestmark = pytest.mark.clock   # again with a near-zero clock in `make test`

POD1, POD2 = "fd00:10:64::24", "fd00:10:64::40"
SP, DP = 54260, 8000
TCP_P, UDP_P, ICMP6_P = 6, 17, 58


def keys(h: LxcHarness, name: str) -> set[bytes]:
    return set(h.coll.maps[name].keys())


def key(daddr: str, saddr: str, dport: int, sport: int, proto: int, flags: int) -> bytes:
    return bytes(CtTuple6.make(daddr, saddr, dport, sport, proto, flags))


def no_ipv4_entries(h: LxcHarness) -> bool:
    return all(not keys(h, m) for m in CT_MAPS)


def no_entries(h: LxcHarness) -> bool:
    return all(not keys(h, m) for m in (*CT_MAPS, *CT6_MAPS))


def both(h: LxcHarness, src: str, sport: int, dst: str, dport: int, flags: str, payload: bytes = b""):
    """One packet across the node: out of the sender's veth, into the receiver's."""
    pkt = tcp(src, sport, dst, dport, flags, payload)
    return h.egress(pkt), h.ingress(pkt)


def frame(*layers: Packet, src: str = POD1, dst: str = POD2, **ip6) -> bytes:
    p: Packet = Ether(src=MAC_A, dst=MAC_B) / IPv6(src=src, dst=dst, **ip6)
    for layer in layers:
        p = p / layer
    return bytes(p)


@pytest.fixture
def h(request: pytest.FixtureRequest) -> LxcHarness:
    """The pod programs with two IPv6 endpoints; per-entry accounting on for tests marked
    ``counting`` (it is off by default)."""
    lx = LxcHarness.load(consts={"ct_accounting": int(request.node.get_closest_marker("counting") is not None)})
    lx.add_endpoint(POD1, 3096)
    lx.add_endpoint(POD2, 4000)
    yield lx
    lx.close()


# --- TCP, UDP, ICMPv6 echo --------------------------------------------------------------------

def test_tcp_whole_life(h: LxcHarness) -> None:
    out_k = key(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)
    in_k = key(POD1, POD2, DP, SP, TCP_P, TUPLE_F_IN)
    e, i = both(h, POD1, SP, POD2, DP, "S")
    assert (e.retval, e.reason, i.reason) == (TC_ACT_OK, "PASS_CT_NEW", "PASS_CT_NEW")
    # The handshake table holds both sides (addresses name the reply direction, ports the original one).
    assert keys(h, CT6_MAP_SYN) == {out_k, in_k} and not keys(h, CT6_MAP_TCP) and not keys(h, CT6_MAP_ANY)
    o = h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)
    assert o.src_sec_id == 3096 and o.seen_non_syn == 0 and diff(o.lifetime, h.now()) in (59, 60)

    e, i = both(h, POD2, DP, POD1, SP, "SA")
    assert (e.reason, i.reason) == ("PASS_CT_REPLY", "PASS_CT_REPLY")
    assert keys(h, CT6_MAP_SYN) == {out_k, in_k}
    e, i = both(h, POD1, SP, POD2, DP, "A")
    assert (e.reason, i.reason) == ("PASS_CT_ESTABLISHED", "PASS_CT_ESTABLISHED")
    # Promoted on the third packet, each with its related-ICMPv6 twin (one per address pair).
    assert keys(h, CT6_MAP_TCP) == {out_k, in_k} and not keys(h, CT6_MAP_SYN)
    assert keys(h, CT6_MAP_ANY) == {key(POD1, POD2, 0, 0, ICMP6_P, TUPLE_F_OUT | TUPLE_F_RELATED),
                                    key(POD1, POD2, 0, 0, ICMP6_P, TUPLE_F_IN | TUPLE_F_RELATED)}
    o = h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)
    assert h.table_of(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT) == CT6_MAP_TCP
    assert o.seen_non_syn == 1 and diff(o.lifetime, h.now()) in (7999, 8000)
    names = events.event_names(str(object_dir() / OBJ_LXC))
    ev = events.read(h.coll.maps[EVENTS_MAP], names)
    assert (ev["insert_syn6"], ev["promoted6"], ev["insert_tcp6"], ev["insert_any6"]) == (2, 2, 2, 2)
    assert (ev["insert_syn"], ev["promoted"], ev["insert_tcp"], ev["insert_any"]) == (0, 0, 0, 0)

    both(h, POD1, SP, POD2, DP, "PA", b"GET / HTTP/1.0\r\n\r\n")
    assert both(h, POD2, DP, POD1, SP, "PA", b"HTTP/1.0 200 OK\r\n\r\n")[0].reason == "PASS_CT_REPLY"
    both(h, POD1, SP, POD2, DP, "FA")
    o = h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)
    assert (o.tx_closing, o.rx_closing) == (1, 0) and diff(o.lifetime, h.now()) >= 7999   # half closed
    both(h, POD2, DP, POD1, SP, "FA")
    both(h, POD1, SP, POD2, DP, "A")
    o = h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)
    assert (o.tx_closing, o.rx_closing) == (1, 1) and diff(o.lifetime, h.now()) in (9, 10)   # close timeout
    assert o.tx_flags_seen == 0x1b and o.rx_flags_seen == 0x1b

    h.advance(5)
    assert h.egress(tcp(POD1, SP, POD2, DP, "S")).reason == "PASS_CT_REOPENED"
    o = h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)
    assert (o.tx_closing, o.rx_closing, o.seen_non_syn, o.packets) == (0, 0, 0, 0)   # no accounting: default
    assert diff(o.lifetime, h.now()) in (59, 60)
    assert no_ipv4_entries(h)


def test_rst(h: LxcHarness) -> None:
    v = h.egress(tcp(POD1, SP, POD2, DP, "R"))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_UNTRACKED_RST")
    assert no_entries(h)
    h.egress(tcp(POD1, SP, POD2, DP, "S"))
    assert h.ingress(tcp(POD2, DP, POD1, SP, "RA")).reason == "PASS_CT_REPLY"
    o = h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)
    assert (o.tx_closing, o.rx_closing) == (1, 1)


@pytest.mark.counting
def test_udp_flow_and_reply(h: LxcHarness) -> None:
    assert h.egress(udp(POD1, 40000, POD2, 53)).reason == "PASS_CT_NEW"
    assert keys(h, CT6_MAP_ANY) == {key(POD1, POD2, 53, 40000, UDP_P, TUPLE_F_OUT),
                                    key(POD1, POD2, 0, 0, ICMP6_P, TUPLE_F_OUT | TUPLE_F_RELATED)}
    u = h.entry(POD1, POD2, 53, 40000, UDP_P, TUPLE_F_OUT)
    assert u.src_sec_id == 3096 and diff(u.lifetime, h.now()) in (59, 60)
    assert h.egress(udp(POD1, 40000, POD2, 53)).reason == "PASS_CT_ESTABLISHED"
    assert h.ingress(udp(POD2, 53, POD1, 40000)).reason == "PASS_CT_REPLY"
    u = h.entry(POD1, POD2, 53, 40000, UDP_P, TUPLE_F_OUT)
    assert (u.packets, u.bytes) == (3, 3 * len(udp(POD1, 40000, POD2, 53)))
    # A source that is no endpoint: world.
    h.ingress(udp("2001:db8::7", 53, POD1, 40001))
    assert h.entry("2001:db8::7", POD1, 40001, 53, UDP_P, TUPLE_F_IN).src_sec_id == 2
    assert no_ipv4_entries(h)


def test_icmpv6_echo_by_identifier(h: LxcHarness) -> None:
    assert h.egress(icmp_echo(POD1, POD2, 0x1234)).reason == "PASS_CT_NEW"
    assert h.entry(POD1, POD2, 0, 0x1234, ICMP6_P, TUPLE_F_OUT) is not None   # request: the id as sport
    assert h.ingress(icmp_echo(POD2, POD1, 0x1234, reply=True)).reason == "PASS_CT_REPLY"
    assert h.egress(icmp_echo(POD1, POD2, 0x1234)).reason == "PASS_CT_ESTABLISHED"
    # Another identifier is another flow.
    assert h.ingress(icmp_echo(POD2, POD1, 0x9999, reply=True)).reason == "PASS_CT_NEW"
    assert h.entry(POD2, POD1, 0x9999, 0, ICMP6_P, TUPLE_F_IN) is not None    # reply: the id as dport
    assert no_ipv4_entries(h)


@pytest.mark.parametrize("type_", [1, 2, 3, 4])
def test_icmpv6_error_related_to_tracked_flow(h: LxcHarness, type_: int) -> None:
    probe = udp(POD1, 40000, POD2, 9)
    unrelated = h.ingress(icmp_error(POD2, POD1, probe, type_))
    assert (unrelated.retval, unrelated.reason) == (TC_ACT_OK, "PASS_ICMP_UNRELATED")
    assert no_entries(h)
    h.egress(probe)
    v = h.ingress(icmp_error(POD2, POD1, probe, type_))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_RELATED")
    assert h.ingress(probe).reason == "PASS_CT_NEW"        # the receiving pod's side relates the error it sends
    assert h.egress(icmp_error(POD2, POD1, probe, type_)).reason == "PASS_CT_RELATED"
    assert no_ipv4_entries(h)


@pytest.mark.parametrize("name,msg", [
    ("router solicitation", ICMPv6ND_RS()),
    ("router advertisement", ICMPv6ND_RA()),
    ("neighbour solicitation", ICMPv6ND_NS(tgt=POD2)),
    ("neighbour advertisement", ICMPv6ND_NA(tgt=POD1)),
    ("redirect", ICMPv6ND_Redirect(tgt=POD2, dst=POD2)),
    ("MLD query", ICMPv6MLQuery()),
])
def test_neighbour_discovery_untouched(h: LxcHarness, name: str, msg: Packet) -> None:
    pkt = frame(msg, dst="ff02::1", hlim=255)
    for prog in ("cil_from_container", "cil_to_container"):
        for _ in range(3):
            v = h.run(prog, pkt)
            assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_ICMP6_UNTRACKED"), name
    assert no_entries(h)


# --- extension headers, fragments ----------------------------------------------------------------

SEG = TCP(sport=SP, dport=DP, flags="S")


@pytest.mark.parametrize("name,ext", [
    ("hop-by-hop", [IPv6ExtHdrHopByHop()]),
    ("routing", [IPv6ExtHdrRouting(addresses=[POD2])]),
    ("destination options", [IPv6ExtHdrDestOpt()]),
    ("authentication header", [AH(nh=TCP_P, payloadlen=4, spi=1, icv=b"\0" * 12)]),   # 24 bytes: (4 + 2) * 4
    ("first fragment", [IPv6ExtHdrFragment(m=1, id=7)]),
    ("four of them", [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(addresses=[POD2]),
                      IPv6ExtHdrFragment(m=1, id=7)]),
])
def test_extension_headers_skipped(h: LxcHarness, name: str, ext: list[Packet]) -> None:
    v = h.egress(frame(*ext, SEG))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_NEW"), name
    assert keys(h, CT6_MAP_SYN) == {key(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)}
    assert h.ingress(frame(*ext, TCP(sport=DP, dport=SP, flags="SA"), src=POD2, dst=POD1)).reason == "PASS_CT_REPLY"


def test_udp_behind_destination_options(h: LxcHarness) -> None:
    assert h.egress(frame(IPv6ExtHdrDestOpt(), UDP(sport=5000, dport=53), Raw(b"q"))).reason == "PASS_CT_NEW"
    assert h.entry(POD1, POD2, 53, 5000, UDP_P, TUPLE_F_OUT) is not None


def test_non_first_fragment_passes_untracked(h: LxcHarness) -> None:
    pkt = frame(IPv6ExtHdrHopByHop(), IPv6ExtHdrFragment(nh=TCP_P, offset=185, m=1, id=7), Raw(b"f" * 16))
    for prog in ("cil_from_container", "cil_to_container"):
        assert h.run(prog, pkt).reason == "PASS_FRAGMENT"
    last = frame(IPv6ExtHdrFragment(nh=UDP_P, offset=3, m=0, id=7), Raw(b"x" * 8))
    assert h.egress(last).reason == "PASS_FRAGMENT"
    assert no_entries(h)


def test_too_many_extension_headers_dropped(h: LxcHarness) -> None:
    five = [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(addresses=[POD2]),
            IPv6ExtHdrFragment(m=1, id=7), IPv6ExtHdrDestOpt()]
    for prog in ("cil_from_container", "cil_to_container"):
        v = h.run(prog, frame(*five, SEG))
        assert (v.retval, v.reason) == (TC_ACT_SHOT, "DROP_INVALID_EXTHDR")
    # Four are walked, the fifth is the chain going on: the same without a transport header behind.
    assert h.egress(frame(*[IPv6ExtHdrDestOpt() for _ in range(5)], UDP())).reason == "DROP_INVALID_EXTHDR"
    assert no_entries(h)


def test_jumbogram_tracked(h: LxcHarness) -> None:
    """Payload length 0 with a hop-by-hop jumbo option: the frame gives the datagram's length."""
    seg = bytes(UDP(sport=5000, dport=53) / Raw(b"j" * 32))
    hbh = IPv6ExtHdrHopByHop(options=[Jumbo(jumboplen=8 + len(seg))])
    pkt = frame(hbh, Raw(seg), plen=0, nh=0)
    assert pkt[18:20] == b"\0\0"
    hbh_pkt = bytearray(pkt)
    hbh_pkt[54] = UDP_P                                   # the hop-by-hop header's next header
    assert h.egress(bytes(hbh_pkt)).reason == "PASS_CT_NEW"
    assert h.entry(POD1, POD2, 53, 5000, UDP_P, TUPLE_F_OUT) is not None
    # The length is not trusted beyond the frame: a header cut short is still dropped.
    assert h.egress(bytes(hbh_pkt[:14 + 40 + 8 + 4])).reason == "DROP_CT_INVALID_HDR"


# --- malformed ------------------------------------------------------------------------------------

def _v6(**kw) -> bytes:
    return frame(SEG, **kw)


# (BPF_PROG_TEST_RUN refuses IPv6 frames shorter than an IPv6 header: see test_fuzz_progs.)
@pytest.mark.parametrize("name,packet,reason", [
    ("version 4 in an ipv6 frame", _v6()[:14] + bytes([0x40 | (_v6()[14] & 0x0F)]) + _v6()[15:], "DROP_INVALID_L3"),
    ("payload length past the frame", _v6(plen=1000), "DROP_INVALID_L3"),
    ("extension header cut", frame(IPv6ExtHdrRouting(addresses=[POD2]))[:14 + 40 + 4], "DROP_INVALID_L3"),
    ("extension header longer than the frame", frame(IPv6ExtHdrDestOpt(len=200), SEG)[:120], "DROP_CT_INVALID_HDR"),
    ("tcp header cut", frame(Raw(b"\0" * 10), nh=TCP_P), "DROP_CT_INVALID_HDR"),
    ("tcp doff below 5", frame(TCP(dataofs=2)), "DROP_CT_INVALID_HDR"),
    ("udp header cut", frame(Raw(b"\0" * 4), nh=UDP_P), "DROP_CT_INVALID_HDR"),
    ("icmpv6 header cut", frame(Raw(b"\x80\0\0"), nh=ICMP6_P), "DROP_CT_INVALID_HDR"),
    ("untracked protocol", frame(Raw(b"\0" * 8), nh=47), "PASS_UNTRACKED_PROTO"),
    ("no next header", frame(Raw(b"\0" * 8), nh=59), "PASS_UNTRACKED_PROTO"),
])
def test_malformed_packets(h: LxcHarness, name: str, packet: bytes, reason: str) -> None:
    for prog in ("cil_from_container", "cil_to_container"):
        v = h.run(prog, packet)
        assert v.reason == reason, name
        assert v.retval == (TC_ACT_SHOT if reason.startswith("DROP_") else TC_ACT_OK)
    assert no_entries(h)


def test_insert_failure_counted_and_signalled_for_the_ipv6_table() -> None:
    lx = LxcHarness.load(consts={"fault_ct_insert": 1})
    try:
        with SignalReader(lx.coll.maps[SIGNAL_MAP], str(object_dir() / OBJ_LXC)) as r:
            assert lx.egress(tcp(POD1, SP, POD2, DP, "S")).reason == "DROP_CT_INSERT_FAILED"
            assert [(s.kind, s.arg) for s in r.poll(100)] == [("CT_FILL_UP", "MAP_TCP6")]
        assert lx.egress(icmp_echo(POD1, POD2, 5)).reason == "DROP_CT_INSERT_FAILED"
        ev = events.read(lx.coll.maps[EVENTS_MAP], events.event_names(str(object_dir() / OBJ_LXC)))
        assert (ev["insert_failed6"], ev["insert_failed"]) == (2, 0)
    finally:
        lx.close()


def test_ipv6_skips_services(h: LxcHarness) -> None:
    """Services are IPv4 only (issue 19): an IPv6 flow is tracked as is, never translated."""
    pkt = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src=POD1, dst=POD2) / ICMPv6EchoRequest(id=1))
    r = h.coll.programs["cil_from_container"].test_run(pkt)
    assert r.retval == TC_ACT_OK and r.data == pkt
