"""The pod-side programs on crafted packets (BPF_PROG_TEST_RUN): verdicts and CT contents."""
from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from lxc_harness import MAC_A, MAC_B, TC_ACT_OK, TC_ACT_SHOT, LxcHarness, icmp_echo, icmp_error, tcp, udp
from tuplet.datapath.abi import TUPLE_F_IN, TUPLE_F_OUT, TUPLE_F_RELATED
from tuplet.datapath.clock import diff

pytestmark = pytest.mark.clock   # again with a near-zero clock in `make test`

POD1, POD2 = "10.64.0.36", "10.64.0.64"
SP, DP = 54260, 8000
TCP_P, UDP_P, ICMP_P = 6, 17, 1


@pytest.fixture
def seedlike() -> LxcHarness:
    """As the seed's nodes ran: no per-entry accounting (Packets=0 Bytes=0)."""
    h = LxcHarness.load(consts={"ct_accounting": 0})
    h.add_endpoint(POD1, 3096)
    h.add_endpoint(POD2, 4000)
    yield h
    h.close()


@pytest.fixture
def counting() -> LxcHarness:
    """With per-entry accounting turned on ([conntrack] accounting = true)."""
    h = LxcHarness.load(consts={"ct_accounting": 1})
    yield h
    h.close()


def out_entry(h: LxcHarness):
    return h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_OUT)


def in_entry(h: LxcHarness):
    return h.entry(POD1, POD2, DP, SP, TCP_P, TUPLE_F_IN)


def both(h: LxcHarness, src: str, sport: int, dst: str, dport: int, flags: str, payload: bytes = b""):
    """One packet across the node: out of the sender's veth, into the receiver's."""
    pkt = tcp(src, sport, dst, dport, flags, payload)
    return h.egress(pkt), h.ingress(pkt)


def test_tcp_whole_life_matches_seed(seedlike: LxcHarness) -> None:
    h = seedlike
    t0 = h.now()
    e, i = both(h, POD1, SP, POD2, DP, "S")
    assert (e.retval, e.reason) == (TC_ACT_OK, "PASS_CT_NEW")
    assert (i.retval, i.reason) == (TC_ACT_OK, "PASS_CT_NEW")
    o = out_entry(h)
    assert o is not None and in_entry(h) is not None
    assert o.seen_non_syn == 0 and o.lifetime - o.last_tx_report == 60  # SYN timeout
    assert o.tx_flags_seen == 0x02 and o.rx_flags_seen == 0

    e, i = both(h, POD2, DP, POD1, SP, "SA")
    assert (e.reason, i.reason) == ("PASS_CT_REPLY", "PASS_CT_REPLY")
    assert out_entry(h).seen_non_syn == 0          # SYN-ACK still carries SYN
    e, i = both(h, POD1, SP, POD2, DP, "A")
    assert (e.reason, i.reason) == ("PASS_CT_ESTABLISHED", "PASS_CT_ESTABLISHED")
    o = out_entry(h)
    assert o.seen_non_syn == 1 and diff(o.lifetime, h.now()) in (7999, 8000)   # established timeout

    both(h, POD1, SP, POD2, DP, "PA", b"GET / HTTP/1.0\r\n\r\n")
    both(h, POD2, DP, POD1, SP, "PA", b"HTTP/1.0 200 OK\r\n\r\n")
    both(h, POD1, SP, POD2, DP, "FA")
    o = out_entry(h)
    assert (o.tx_closing, o.rx_closing) == (1, 0) and diff(o.lifetime, h.now()) >= 7999  # half closed: alive
    ii = in_entry(h)
    assert (ii.tx_closing, ii.rx_closing) == (0, 1)
    both(h, POD2, DP, POD1, SP, "FA")
    both(h, POD1, SP, POD2, DP, "A")
    t1 = h.now()

    recs = {(r.direction, r.proto, r.related): r for r in h.entries()}
    assert set(recs) == {("OUT", "TCP", False), ("IN", "TCP", False), ("OUT", "ICMP", True), ("IN", "ICMP", True)}
    out, inn = recs[("OUT", "TCP", False)], recs[("IN", "TCP", False)]
    t = out.entry.last_tx_report
    assert diff(t, t0) >= 0 and diff(t1, t) >= 0
    # The seed's line (node-a), with this run's clock.
    assert out.line() == (
        f"TCP OUT 10.64.0.36:54260 -> 10.64.0.64:8000 expires={out.entry.lifetime} Packets=0 Bytes=0 "
        f"RxFlagsSeen=0x1b LastRxReport={out.entry.last_rx_report} TxFlagsSeen=0x1b LastTxReport={t} "
        "Flags=0x0013 [ RxClosing TxClosing SeenNonSyn ] RevNAT=0 SourceSecurityID=3096 IfIndex=0 BackendID=0")
    # The close timeout from the last packet either way (a second may tick between them).
    assert out.entry.lifetime == max(out.entry.last_rx_report, t) + 10
    # node-b's IN line: same tuple, same identity (the sender's), closing both ways.
    assert inn.line().startswith("TCP IN 10.64.0.36:54260 -> 10.64.0.64:8000 expires=")
    assert "RxFlagsSeen=0x1b" in inn.line() and "TxFlagsSeen=0x1b" in inn.line()
    assert "Flags=0x0013 [ RxClosing TxClosing SeenNonSyn ] RevNAT=0 SourceSecurityID=3096" in inn.line()
    # The related ICMP entries, as the seed prints them.
    rel = recs[("OUT", "ICMP", True)]
    ts = rel.entry.last_tx_report
    assert t0 <= ts <= t1
    assert rel.line() == (
        f"ICMP OUT 10.64.0.36:0 -> 10.64.0.64:0 related expires={ts + 60} Packets=0 Bytes=0 "
        f"RxFlagsSeen=0x00 LastRxReport=0 TxFlagsSeen=0x02 LastTxReport={ts} Flags=0x0000 [ ] "
        "RevNAT=0 SourceSecurityID=3096 IfIndex=0 BackendID=0")
    rin = recs[("IN", "ICMP", True)]
    assert rin.line().endswith("TxFlagsSeen=0x00 LastTxReport=0 Flags=0x0000 [ ] RevNAT=0 "
                               "SourceSecurityID=3096 IfIndex=0 BackendID=0")
    assert f"RxFlagsSeen=0x02 LastRxReport={rin.entry.last_rx_report}" in rin.line()


def test_syn_after_close_reopens(counting: LxcHarness) -> None:
    for flags in ("S", "SA", "A", "FA"):
        src, sp, dst, dp = (POD1, SP, POD2, DP) if flags in ("S", "A") else (POD2, DP, POD1, SP)
        counting.egress(tcp(src, sp, dst, dp, flags))
    counting.egress(tcp(POD1, SP, POD2, DP, "FA"))
    o = out_entry(counting)
    assert o.tx_closing and o.rx_closing is not None
    # The OUT entry saw pod1's FIN (tx) and pod2's FIN only as the IN side... make it fully closed:
    counting.ingress(tcp(POD2, DP, POD1, SP, "FA"))
    o = out_entry(counting)
    assert (o.tx_closing, o.rx_closing) == (1, 1)
    assert diff(o.lifetime, counting.now()) in (9, 10)

    counting.advance(5)
    v = counting.egress(tcp(POD1, SP, POD2, DP, "S"))
    assert v.reason == "PASS_CT_REOPENED"
    o = out_entry(counting)
    assert (o.tx_closing, o.rx_closing, o.seen_non_syn) == (0, 0, 0)
    assert o.tx_flags_seen == 0x02 and o.rx_flags_seen == 0
    assert diff(o.lifetime, counting.now()) in (59, 60)
    assert o.packets == 1


def test_lifetimes_follow_the_clock(lxc: LxcHarness) -> None:
    lxc.egress(tcp(POD1, SP, POD2, DP, "S"))
    lxc.ingress(tcp(POD2, DP, POD1, SP, "SA"))
    lxc.egress(tcp(POD1, SP, POD2, DP, "A"))
    before = out_entry(lxc).lifetime
    lxc.advance(1000)
    lxc.egress(tcp(POD1, SP, POD2, DP, "PA", b"x"))
    after = out_entry(lxc).lifetime
    assert diff(after, before) in (1000, 1001)
    assert diff(after, lxc.now()) in (7999, 8000)


def test_configured_timeouts_apply() -> None:
    h = LxcHarness.load(consts={"ct_syn_timeout": 7, "ct_lifetime_tcp": 333, "ct_lifetime_nontcp": 44})
    try:
        h.egress(tcp(POD1, SP, POD2, DP, "S"))
        assert diff(out_entry(h).lifetime, h.now()) in (6, 7)
        h.egress(tcp(POD1, SP, POD2, DP, "A"))
        assert diff(out_entry(h).lifetime, h.now()) in (332, 333)
        h.egress(udp(POD1, 5000, POD2, 53))
        u = h.entry(POD1, POD2, 53, 5000, UDP_P, TUPLE_F_OUT)
        assert diff(u.lifetime, h.now()) in (43, 44)
    finally:
        h.close()


def test_rst_before_handshake_closes_both(lxc: LxcHarness) -> None:
    lxc.egress(tcp(POD1, SP, POD2, DP, "S"))
    v = lxc.ingress(tcp(POD2, DP, POD1, SP, "RA"))
    assert v.reason == "PASS_CT_REPLY"
    o = out_entry(lxc)
    assert (o.tx_closing, o.rx_closing) == (1, 1)
    assert diff(o.lifetime, lxc.now()) in (9, 10)


def test_rst_after_handshake_closes_its_direction(lxc: LxcHarness) -> None:
    """Both SYNs were seen: a reset closes the side that sent it (the reference never got here)."""
    lxc.egress(tcp(POD1, SP, POD2, DP, "S"))
    lxc.ingress(tcp(POD2, DP, POD1, SP, "SA"))
    lxc.egress(tcp(POD1, SP, POD2, DP, "A"))
    lxc.ingress(tcp(POD2, DP, POD1, SP, "R"))
    o = out_entry(lxc)
    assert (o.tx_closing, o.rx_closing) == (0, 1)
    lxc.egress(tcp(POD1, SP, POD2, DP, "R"))
    o = out_entry(lxc)
    assert (o.tx_closing, o.rx_closing) == (1, 1)
    assert diff(o.lifetime, lxc.now()) in (9, 10)


def test_rst_without_entry_is_not_tracked(lxc: LxcHarness) -> None:
    v = lxc.egress(tcp(POD1, SP, POD2, DP, "R"))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_UNTRACKED_RST")
    assert lxc.entries() == []


def test_udp_flow_and_reply(counting: LxcHarness) -> None:
    counting.add_endpoint(POD1, 77)
    v = counting.egress(udp(POD1, 40000, POD2, 53))
    assert v.reason == "PASS_CT_NEW"
    u = counting.entry(POD1, POD2, 53, 40000, UDP_P, TUPLE_F_OUT)
    assert u is not None and u.src_sec_id == 77 and diff(u.lifetime, counting.now()) in (59, 60)
    assert counting.entry(POD1, POD2, 0, 0, ICMP_P, TUPLE_F_OUT | TUPLE_F_RELATED) is not None
    assert counting.egress(udp(POD1, 40000, POD2, 53)).reason == "PASS_CT_ESTABLISHED"
    assert counting.ingress(udp(POD2, 53, POD1, 40000)).reason == "PASS_CT_REPLY"
    u = counting.entry(POD1, POD2, 53, 40000, UDP_P, TUPLE_F_OUT)
    assert (u.packets, u.tx_flags_seen, u.rx_flags_seen) == (3, 0, 0)
    assert u.bytes == 3 * len(udp(POD1, 40000, POD2, 53))


def test_icmp_echo_and_reply(lxc: LxcHarness) -> None:
    assert lxc.egress(icmp_echo(POD1, POD2, 0x1234)).reason == "PASS_CT_NEW"
    assert lxc.ingress(icmp_echo(POD2, POD1, 0x1234, reply=True)).reason == "PASS_CT_REPLY"
    (rec,) = [r for r in lxc.entries() if not r.related]
    assert rec.line().startswith(f"ICMP OUT {POD1}:{0x1234} -> {POD2}:0 expires=")
    # A different identifier is a different flow.
    assert lxc.ingress(icmp_echo(POD2, POD1, 0x9999, reply=True)).reason == "PASS_CT_NEW"


def test_icmp_error_related_to_tracked_flow(lxc: LxcHarness) -> None:
    probe = udp(POD1, 40000, POD2, 9)
    lxc.egress(probe)
    v = lxc.ingress(icmp_error(POD2, POD1, probe))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_RELATED")
    # Same on the receiving pod's side: its IN entry relates the error it sends.
    h_in = lxc.ingress(probe)
    assert h_in.reason == "PASS_CT_NEW"
    assert lxc.egress(icmp_error(POD2, POD1, probe)).reason == "PASS_CT_RELATED"


def test_unrelated_icmp_error_creates_nothing(lxc: LxcHarness) -> None:
    v = lxc.ingress(icmp_error("192.0.2.1", POD1, udp(POD1, 1, "192.0.2.1", 2)))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_ICMP_UNRELATED")
    assert lxc.entries() == []


def _ip(**kw) -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=POD1, dst=POD2, **kw) / TCP(sport=1, dport=2, flags="S"))


@pytest.mark.parametrize("name,packet,reason", [
    ("arp", bytes(Ether() / ARP(pdst=POD2)), "PASS_NOT_IPV4"),
    ("gre", bytes(Ether() / IP(src=POD1, dst=POD2, proto=47) / Raw(b"\0" * 8)), "PASS_UNTRACKED_PROTO"),
    ("later fragment", bytes(Ether() / IP(src=POD1, dst=POD2, proto=6, frag=100) / Raw(b"\0" * 8)), "PASS_FRAGMENT"),
    # (BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4 header; the verifier
    # guarantees the programs never read past data_end for those.)
    ("tot_len below the header", bytes(Ether() / IP(src=POD1, dst=POD2, len=10) / TCP()), "DROP_INVALID_L3"),
    ("ihl below 5", _ip()[:14] + bytes([0x44]) + _ip()[15:], "DROP_INVALID_L3"),
    ("ihl past the end", _ip()[:14] + bytes([0x4F]) + _ip()[15:14 + 40], "DROP_INVALID_L3"),
    ("version 6 in ipv4 frame", _ip()[:14] + bytes([0x65]) + _ip()[15:], "DROP_INVALID_L3"),
    ("tot_len past the frame", bytes(Ether() / IP(src=POD1, dst=POD2, len=1000) / TCP()), "DROP_INVALID_L3"),
    ("tcp header cut", bytes(Ether() / IP(src=POD1, dst=POD2, proto=6) / Raw(b"\0" * 10)), "DROP_CT_INVALID_HDR"),
    ("frame cut inside tcp", _ip()[:14 + 20 + 10], "DROP_INVALID_L3"),
    ("tcp doff below 5", bytes(Ether() / IP(src=POD1, dst=POD2) / TCP(dataofs=2)), "DROP_CT_INVALID_HDR"),
    ("udp header cut", bytes(Ether() / IP(src=POD1, dst=POD2, proto=17) / Raw(b"\0" * 4)), "DROP_CT_INVALID_HDR"),
    ("icmp header cut", bytes(Ether() / IP(src=POD1, dst=POD2, proto=1) / Raw(b"\0" * 3)), "DROP_CT_INVALID_HDR"),
])
def test_malformed_and_foreign_packets(lxc: LxcHarness, name: str, packet: bytes, reason: str) -> None:
    for prog in ("cil_from_container", "cil_to_container"):
        v = lxc.run(prog, packet)
        assert v.reason == reason, name
        assert v.retval == (TC_ACT_SHOT if reason.startswith("DROP_") else TC_ACT_OK)
    assert lxc.entries() == []


def test_ethernet_padding_is_not_truncation(lxc: LxcHarness) -> None:
    pkt = udp(POD1, 1000, POD2, 53, b"") + b"\0" * 18   # padded to the 60-byte minimum frame
    assert lxc.egress(pkt).reason == "PASS_CT_NEW"


def established(h: LxcHarness, sport: int) -> None:
    for src, sp, dst, dp, flags in ((POD1, sport, POD2, DP, "S"), (POD2, DP, POD1, sport, "SA"),
                                    (POD1, sport, POD2, DP, "A")):
        both(h, src, sp, dst, dp, flags)


def test_counters_are_off_by_default(lxc: LxcHarness) -> None:
    """The reference's default: Packets=0 Bytes=0 on every entry, whatever passed."""
    established(lxc, SP)
    both(lxc, POD1, SP, POD2, DP, "PA", b"x" * 100)
    lxc.egress(udp(POD1, 40000, POD2, 53))
    recs = lxc.entries()
    assert len(recs) >= 5 and all((r.entry.packets, r.entry.bytes) == (0, 0) for r in recs)


def test_counters_count_when_turned_on(counting: LxcHarness) -> None:
    h = counting
    established(h, SP)
    both(h, POD1, SP, POD2, DP, "PA", b"x" * 100)
    o = out_entry(h)
    assert o.packets == 4
    assert o.bytes == sum(len(tcp(POD1, SP, POD2, DP, f)) for f in ("S", "SA", "A")) + \
        len(tcp(POD1, SP, POD2, DP, "PA", b"x" * 100))


def test_established_packets_within_a_second_leave_the_entry_as_it_was(lxc: LxcHarness) -> None:
    """No per-packet store of a value that does not change: once the flow is established and
    its flags are seen, more packets in the same clock second leave every byte of both entries
    alone; the next second moves the lifetime (and nothing but it, inside the report interval)."""
    established(lxc, SP)
    both(lxc, POD1, SP, POD2, DP, "A")
    both(lxc, POD2, DP, POD1, SP, "A")
    # Far from a tick of the datapath's clock (whole seconds of a coarse clock, which lags
    # CLOCK_MONOTONIC by up to a jiffy): start 0.1 s after one; the packets take milliseconds.
    frac = time.clock_gettime(time.CLOCK_MONOTONIC) % 1
    time.sleep((1.1 - frac) % 1)
    t = lxc.now()
    both(lxc, POD1, SP, POD2, DP, "A")
    both(lxc, POD2, DP, POD1, SP, "A")
    before = (bytes(out_entry(lxc)), bytes(in_entry(lxc)))
    for _ in range(5):
        both(lxc, POD1, SP, POD2, DP, "A")
        both(lxc, POD2, DP, POD1, SP, "A")
    after = (bytes(out_entry(lxc)), bytes(in_entry(lxc)))
    assert lxc.now() == t, "the clock ticked: the machine stalled for most of a second"
    assert after == before
    o = out_entry(lxc)
    lxc.advance(1)
    both(lxc, POD1, SP, POD2, DP, "A")
    moved = out_entry(lxc)
    assert diff(moved.lifetime, o.lifetime) >= 1
    assert (moved.last_tx_report, moved.tx_flags_seen, moved.seen_non_syn) == \
        (o.last_tx_report, o.tx_flags_seen, o.seen_non_syn)
