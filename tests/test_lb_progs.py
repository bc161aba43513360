"""Services through the real programs (BPF_PROG_TEST_RUN): DNAT and reverse NAT with
checksums checked by scapy, CT_SERVICE/CT_EGRESS contents as the seed prints them,
backend stickiness, rebalance after close, affinity, NodePort/LoadBalancer on the NIC."""
from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass

import pytest
from scapy.layers.inet import UDP
from scapy.layers.l2 import Ether

from lb_harness import F_EXTERNAL, F_LOADBALANCER, F_NODEPORT, LbHarness, Svc, checksums_ok, l4_of, tcp4, udp4
from lxc_harness import TC_ACT_OK, TC_ACT_SHOT, tcp
from tuplet.datapath.abi import CT_MAP_SYN, CT_MAP_TCP, NAT_MAP, TUPLE_F_OUT, TUPLE_F_SERVICE
from tuplet.datapath.cttables import Family
from tuplet.datapath.layouts import CtEntry, CtTuple4, Nat4Entry, ip_to_be32

pytestmark = pytest.mark.clock   # again with a near-zero clock in `make test`

POD1, POD2, POD3 = "10.64.0.36", "10.64.0.98", "10.64.0.64"
VIP, VPORT = "10.68.174.146", 80
SP, BP = 59530, 8000
TCP_P, UDP_P = 6, 17

CLIENT, LB_VIP, LB_POD = "172.191.0.1", "172.190.0.17", "10.64.0.39"


@pytest.fixture
def lb() -> LbHarness:
    h = LbHarness.load_both()
    h.add_endpoint(POD1, 3096)
    h.add_endpoint(POD2, 4000)
    h.add_endpoint(POD3, 4001)
    h.add_endpoint(LB_POD, 4002)
    yield h
    h.close()


def clusterip(backends: dict[int, tuple[str, int, bool]] | None = None, **kw) -> Svc:
    return Svc(VIP, VPORT, TCP_P, 15, {19: (POD2, BP, False)} if backends is None else backends, **kw)


def pod1_sends(h: LbHarness, flags: str, sport: int = SP, payload: bytes = b""):
    """pod1 -> VIP: out of pod1's veth (DNAT), then into the backend's veth."""
    v, out = h.run_out("cil_from_container", tcp4(POD1, sport, VIP, VPORT, flags, payload))
    assert v.retval == TC_ACT_OK, v
    assert checksums_ok(out)
    h.run_out("cil_to_container", out)
    return v, out


def backend_replies(h: LbHarness, backend: str, flags: str, sport: int = SP, payload: bytes = b""):
    """backend -> pod1: out of the backend's veth, then into pod1's (reverse NAT)."""
    h.run_out("cil_from_container", tcp4(backend, BP, POD1, sport, flags, payload))
    v, out = h.run_out("cil_to_container", tcp4(backend, BP, POD1, sport, flags, payload))
    assert v.retval == TC_ACT_OK, v
    assert checksums_ok(out)
    return v, out


@dataclass(frozen=True)
class Seed:
    """The seed's ClusterIP flow in one family: client pod, backend pod, VIP."""

    pod1: str
    pod2: str
    vip: str
    icmp: str                 # the related entries' protocol name

    def ep(self, addr: str, port: int) -> str:
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


SEED4 = Seed(POD1, POD2, VIP, "ICMP")
SEED6 = Seed("2001:db8:64::24", "2001:db8:64::62", "fd00::10", "ICMPv6")


@pytest.mark.parametrize("f", [SEED4, SEED6], ids=["ipv4", "ipv6"])
def test_clusterip_tcp_matches_seed(lb: LbHarness, f: Seed) -> None:
    """The SVC, OUT (and its related entry) and IN lines of one ClusterIP flow as the
    reference prints them; IPv6 addresses bracketed, in the IPv6 tables."""
    lb.add_endpoint(SEED6.pod1, 3096)
    lb.add_endpoint(SEED6.pod2, 4000)
    lb.program(Svc(f.vip, VPORT, TCP_P, 15, {19: (f.pod2, BP, False)}))
    t0 = lb.now()

    def sends(flags: str, payload: bytes = b"") -> bytes:
        v, out = lb.run_out("cil_from_container", tcp(f.pod1, SP, f.vip, VPORT, flags, payload))
        assert v.retval == TC_ACT_OK and checksums_ok(out), v
        lb.run_out("cil_to_container", out)
        return out

    def replies(flags: str, payload: bytes = b"") -> bytes:
        lb.run_out("cil_from_container", tcp(f.pod2, BP, f.pod1, SP, flags, payload))
        v, back = lb.run_out("cil_to_container", tcp(f.pod2, BP, f.pod1, SP, flags, payload))
        assert v.retval == TC_ACT_OK and checksums_ok(back), v
        assert l4_of(back) == (f.vip, VPORT, f.pod1, SP)          # the pod sees the VIP answer
        return back

    assert l4_of(sends("S")) == (f.pod1, SP, f.pod2, BP)
    replies("SA")
    sends("A")
    sends("PA", b"GET / HTTP/1.0\r\n\r\n")
    replies("PA", b"HTTP/1.0 200 OK\r\n\r\n")
    sends("FA")
    replies("FA")
    sends("A")
    t1 = lb.now()

    every = lb.entries(Family.IPV4, Family.IPV6)
    recs = {(r.direction, r.proto, r.related, r.dst[0]): r for r in every}
    assert {r.family.value for r in recs.values()} == {"ipv6" if f is SEED6 else "ipv4"}
    svc = recs[("SVC", "TCP", False, f.vip)]
    t = svc.entry.last_tx_report
    assert t0 <= t <= t1
    assert svc.line() == (
        f"TCP SVC {f.ep(f.pod1, SP)} -> {f.ep(f.vip, VPORT)} expires={t + 10} Packets=0 Bytes=0 "
        f"RxFlagsSeen=0x00 LastRxReport=0 TxFlagsSeen=0x1b LastTxReport={t} Flags=0x0013 "
        "[ RxClosing TxClosing SeenNonSyn ] RevNAT=15 SourceSecurityID=0 IfIndex=0 BackendID=19")
    out = recs[("OUT", "TCP", False, f.pod2)]
    assert out.line().startswith(f"TCP OUT {f.ep(f.pod1, SP)} -> {f.ep(f.pod2, BP)} expires=")
    assert "RxFlagsSeen=0x1b" in out.line() and "TxFlagsSeen=0x1b" in out.line()
    assert out.line().endswith("Flags=0x0013 [ RxClosing TxClosing SeenNonSyn ] RevNAT=15 "
                               "SourceSecurityID=3096 IfIndex=0 BackendID=0")
    rel = recs[("OUT", f.icmp, True, f.pod2)]
    assert rel.line().startswith(f"{f.icmp} OUT {f.ep(f.pod1, 0)} -> {f.ep(f.pod2, 0)} related ")
    assert rel.line().endswith("TxFlagsSeen=0x02 LastTxReport=%d Flags=0x0000 [ ] RevNAT=15 "
                               "SourceSecurityID=3096 IfIndex=0 BackendID=0" % rel.entry.last_tx_report)
    # The backend's side is plain pod-to-pod: no service entry, no rev-NAT.
    inn = recs[("IN", "TCP", False, f.pod2)]
    rx, tx = inn.entry.last_rx_report, inn.entry.last_tx_report   # a second may tick between them
    assert t0 <= rx <= t1 and t0 <= tx <= t1
    assert inn.line() == (
        f"TCP IN {f.ep(f.pod1, SP)} -> {f.ep(f.pod2, BP)} expires={inn.entry.lifetime} Packets=0 Bytes=0 "
        f"RxFlagsSeen=0x1b LastRxReport={rx} TxFlagsSeen=0x1b LastTxReport={tx} Flags=0x0013 "
        "[ RxClosing TxClosing SeenNonSyn ] RevNAT=0 SourceSecurityID=3096 IfIndex=0 BackendID=0")
    assert not [r for r in every if r.direction == "SVC" and r.dst[0] != f.vip]


def test_service_entries_never_count() -> None:
    """With accounting on, a service flow's packets count on its endpoint entries, never on its
    CT_SERVICE entry (the reference's Packets=0 Bytes=0 there)."""
    h = LbHarness.load_both(consts={"ct_accounting": 1})
    try:
        h.add_endpoint(POD1, 3096)
        h.add_endpoint(POD2, 4000)
        h.program(clusterip())
        for flags in ("S", "A", "PA"):
            pod1_sends(h, flags)
        recs = {r.direction: r.entry for r in h.entries() if r.proto == "TCP"}
        assert (recs["SVC"].packets, recs["SVC"].bytes) == (0, 0)
        assert recs["OUT"].packets == 3 and recs["OUT"].bytes > 0
    finally:
        h.close()


def test_established_connection_keeps_its_backend(lb: LbHarness) -> None:
    lb.program(clusterip())
    pod1_sends(lb, "S")
    backend_replies(lb, POD2, "SA")
    pod1_sends(lb, "A")
    # The service's set changes to two other backends (19 stays a known backend).
    lb.program(clusterip({20: (POD3, BP, False), 21: (LB_POD, BP, False)}, bank=1))
    for _ in range(5):
        _, out = pod1_sends(lb, "PA", payload=b"x")
        assert l4_of(out)[2] == POD2
    # New connections pick from the current set only.
    picked = {l4_of(pod1_sends(lb, "S", sport=40000 + i)[1])[2] for i in range(30)}
    assert picked == {POD3, LB_POD}


def test_backend_gone_reselects(lb: LbHarness) -> None:
    lb.program(clusterip({19: (POD2, BP, False), 20: (POD3, BP, False)}))
    _, out = pod1_sends(lb, "S")
    first = l4_of(out)[2]
    gone = 19 if first == POD2 else 20
    lb.program(clusterip({20: (POD3, BP, False)} if gone == 19 else {19: (POD2, BP, False)}, bank=1))
    lb.remove_backend(gone)
    _, out = pod1_sends(lb, "A")
    assert l4_of(out)[2] != first
    key = [r for r in lb.entries() if r.direction == "SVC"][0]
    assert key.entry.backend_id == (20 if gone == 19 else 19)


def test_syn_after_close_keeps_backend_within_grace_then_rebalances(lb: LbHarness) -> None:
    lb.program(clusterip())
    for flags in ("S", "A", "FA"):
        pod1_sends(lb, flags)
    svc = [r for r in lb.entries() if r.direction == "SVC"][0].entry
    assert (svc.rx_closing, svc.tx_closing) == (1, 1)
    lb.program(clusterip({20: (POD3, BP, False)}, bank=1))     # backend 19 still exists
    lb.advance(30)                                             # within the 60 s grace
    v, out = pod1_sends(lb, "S")
    assert l4_of(out)[2] == POD2 and v.reason in ("PASS_CT_REOPENED", "PASS_CT_NEW")
    pod1_sends(lb, "FA")
    lb.advance(61)                                             # past the grace
    _, out = pod1_sends(lb, "S")
    assert l4_of(out)[2] == POD3
    assert [r for r in lb.entries() if r.direction == "SVC"][0].entry.backend_id == 20


def test_udp_dnat_rev_nat_and_checksums(lb: LbHarness) -> None:
    lb.program(Svc(VIP, 53, UDP_P, 7, {5: (POD2, 5353, False)}))
    for csum in (None, 0):                     # computed checksum, and "no checksum"
        v, out = lb.run_out("cil_from_container", udp4(POD1, 40001, VIP, 53, b"query", csum=csum))
        assert v.retval == TC_ACT_OK and l4_of(out) == (POD1, 40001, POD2, 5353)
        assert checksums_ok(out)
        assert (Ether(out)[UDP].chksum == 0) == (csum == 0)
        v, back = lb.run_out("cil_to_container", udp4(POD2, 5353, POD1, 40001, b"answer", csum=csum))
        assert v.reason == "PASS_CT_REPLY" and l4_of(back) == (VIP, 53, POD1, 40001)
        assert checksums_ok(back)
        lb.coll.maps["tpl_ct_any4_v1"].clear()
    v, out = lb.run_out("cil_from_container", udp4(POD1, 40002, VIP, 53))
    svc = lb.entry(POD1, VIP, 53, 40002, UDP_P, TUPLE_F_SERVICE)
    assert svc is not None and svc.backend_id == 5 and svc.rev_nat_index == 7
    assert svc.lifetime - lb.now() in (59, 60)


def test_service_without_backends_drops(lb: LbHarness) -> None:
    lb.program(clusterip({}))
    v, _ = lb.run_out("cil_from_container", tcp4(POD1, SP, VIP, VPORT, "S"))
    assert (v.retval, v.reason) == (TC_ACT_SHOT, "DROP_NO_SERVICE_BACKEND")
    assert lb.entries() == []


def test_reply_without_rev_nat_entry_is_dropped(lb: LbHarness) -> None:
    lb.program(clusterip())
    pod1_sends(lb, "S")
    lb.coll.maps["tpl_lb4_reverse_nat_v1"].delete((15).to_bytes(2, "little"))
    v, _ = lb.run_out("cil_to_container", tcp4(POD2, BP, POD1, SP, "SA"))
    assert (v.retval, v.reason) == (TC_ACT_SHOT, "DROP_REV_NAT_MISSING")


def test_affinity_keeps_a_client_on_one_backend(lb: LbHarness) -> None:
    three = {19: (POD2, BP, False), 20: (POD3, BP, False), 21: (LB_POD, BP, False)}
    lb.program(clusterip(three, affinity_timeout=100))
    picked = {l4_of(pod1_sends(lb, "S", sport=41000 + i)[1])[2] for i in range(20)}
    assert len(picked) == 1
    lb.advance(101)            # the client was last seen more than the timeout ago
    later = {l4_of(pod1_sends(lb, "S", sport=42000 + i)[1])[2] for i in range(20)}
    assert len(later) == 1
    lb.program(clusterip(three))   # affinity off: flows spread again
    spread = {l4_of(pod1_sends(lb, "S", sport=43000 + i)[1])[2] for i in range(30)}
    assert len(spread) > 1


def test_nodeport_local_backend_and_reply(lb: LbHarness) -> None:
    lb.program(Svc(LB_VIP, 80, TCP_P, 24, {24: (LB_POD, BP, False)}, flags=F_EXTERNAL | F_LOADBALANCER))
    v, out = lb.run_out("cil_from_netdev", tcp4(CLIENT, 53438, LB_VIP, 80, "S"))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_NEW")
    assert l4_of(out) == (CLIENT, 53438, LB_POD, BP) and checksums_ok(out)
    lb.run_out("cil_to_container", out)
    lb.run_out("cil_from_container", tcp4(LB_POD, BP, CLIENT, 53438, "SA"))
    v, back = lb.run_out("cil_to_netdev", tcp4(LB_POD, BP, CLIENT, 53438, "SA"))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_REPLY")
    assert l4_of(back) == (LB_VIP, 80, CLIENT, 53438) and checksums_ok(back)
    v, out = lb.run_out("cil_from_netdev", tcp4(CLIENT, 53438, LB_VIP, 80, "A"))
    assert v.reason == "PASS_CT_ESTABLISHED" and l4_of(out)[2] == LB_POD
    lb.run_out("cil_to_container", out)    # the handshake's ACK reaches the pod

    recs = {(r.direction, r.proto, r.related): r for r in lb.entries()}
    assert {r.map_name for r in lb.entries() if r.proto == "TCP"} == {CT_MAP_TCP}   # all established
    svc = recs[("SVC", "TCP", False)]
    assert svc.line().startswith("TCP SVC 172.191.0.1:53438 -> 172.190.0.17:80 ")
    assert svc.line().endswith("RevNAT=24 SourceSecurityID=0 IfIndex=0 BackendID=24")
    out_e = lb.entry(CLIENT, LB_POD, BP, 53438, TCP_P, TUPLE_F_OUT)
    assert out_e is not None and out_e.node_port == 1 and out_e.rev_nat_index == 24
    assert "NodePort" in out_e.flag_names and out_e.ifindex != 0
    # NodePort flows have no related-ICMP twin on the NIC side; the pod's IN entry has one.
    assert ("OUT", "ICMP", True) not in recs and ("IN", "ICMP", True) in recs


def test_nodeport_on_node_address(lb: LbHarness) -> None:
    node_ip = "192.168.50.2"
    lb.program(Svc(node_ip, 30080, UDP_P, 30, {31: (LB_POD, 9000, False)}, flags=F_EXTERNAL | F_NODEPORT))
    v, out = lb.run_out("cil_from_netdev", udp4(CLIENT, 5000, node_ip, 30080, b"ping"))
    assert v.reason == "PASS_CT_NEW" and l4_of(out) == (CLIENT, 5000, LB_POD, 9000) and checksums_ok(out)
    v, back = lb.run_out("cil_to_netdev", udp4(LB_POD, 9000, CLIENT, 5000, b"pong"))
    assert v.reason == "PASS_CT_REPLY" and l4_of(back) == (node_ip, 30080, CLIENT, 5000) and checksums_ok(back)


def test_nodeport_remote_backend_is_a_counted_drop(lb: LbHarness) -> None:
    lb.program(Svc(LB_VIP, 80, TCP_P, 24, {24: ("10.65.0.9", BP, True)}, flags=F_EXTERNAL | F_LOADBALANCER))
    v, _ = lb.run_out("cil_from_netdev", tcp4(CLIENT, 53438, LB_VIP, 80, "S"))
    assert (v.retval, v.reason) == (TC_ACT_SHOT, "DROP_REMOTE_BACKEND")
    assert lb.entries() == []
    # From a pod the same backend is reachable through the routed pod network.
    v, out = lb.run_out("cil_from_container", tcp4(POD1, SP, LB_VIP, 80, "S"))
    assert v.reason == "PASS_CT_NEW" and l4_of(out)[2] == "10.65.0.9"


def test_netdev_leaves_other_traffic_alone(lb: LbHarness) -> None:
    lb.program(clusterip())                              # ClusterIP: not reachable from the NIC
    for prog, pkt in (("cil_from_netdev", tcp4(CLIENT, 1000, VIP, VPORT, "S")),
                      ("cil_from_netdev", tcp4(CLIENT, 1000, POD1, 22, "S")),
                      ("cil_to_netdev", tcp4(POD1, 22, CLIENT, 1000, "SA"))):
        v, out = lb.run_out(prog, pkt)
        assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_NETDEV_UNTRACKED")
        assert out == pkt
    assert lb.entries() == []


def test_to_netdev_probes_nothing_without_nic_services_or_overlay(lb: LbHarness) -> None:
    """A node with neither NodePort/LoadBalancer services nor an overlay sends no NodePort or DSR
    reply: cil_to_netdev passes its packets without a table probe (an entry that would match is
    not even refreshed); once such a service is written, the same reply gets its rev-NAT."""
    key = (CLIENT, LB_POD, BP, 53438, TCP_P, TUPLE_F_OUT)   # a NodePort flow's CT_EGRESS entry
    lb.coll.maps[CT_MAP_TCP].update(CtTuple4.make(*key),
                                    CtEntry(lifetime=lb.now() + 100, node_port=1, rev_nat_index=24,
                                            seen_non_syn=1))
    reply = tcp4(LB_POD, BP, CLIENT, 53438, "PA", b"hi")
    v, out = lb.run_out("cil_to_netdev", reply)
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_NETDEV_UNTRACKED") and out == reply
    assert lb.entry(*key).rx_flags_seen == 0                # not probed
    lb.program(Svc(LB_VIP, 80, TCP_P, 24, {24: (LB_POD, BP, False)}, flags=F_EXTERNAL | F_LOADBALANCER))
    v, out = lb.run_out("cil_to_netdev", reply)
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_REPLY")
    assert l4_of(out) == (LB_VIP, 80, CLIENT, 53438) and checksums_ok(out)
    assert lb.entry(*key).rx_flags_seen & 0x18


def test_maglev_choice_is_deterministic_across_nodes_and_balanced() -> None:
    backends = {i: (f"10.64.1.{i}", BP, False) for i in range(1, 6)}
    svc = Svc(LB_VIP, 80, TCP_P, 40, backends, flags=F_EXTERNAL | F_LOADBALANCER, maglev_size=1021)
    picks = []
    for _ in range(2):                                   # two nodes, same table, same flows
        h = LbHarness.load_both()
        try:
            h.program(svc)
            picks.append([l4_of(h.run_out("cil_from_netdev", tcp4(f"172.191.{i % 250}.{i // 250 + 1}", 1024 + i,
                                                                 LB_VIP, 80, "S"))[1])[2] for i in range(1000)])
        finally:
            h.close()
    assert picks[0] == picks[1]
    counts = Counter(picks[0])
    assert set(counts) == {a for a, _, _ in backends.values()}
    assert all(120 <= c <= 280 for c in counts.values()), counts     # 200 expected each


# --- DSR over Geneve (issue 4): what test_run can show; the Geneve path end to end is tests/vm/test_vm_dsr.py ---

TC_ACT_REDIRECT = 7


def test_lb_node_redirects_remote_backend_over_the_overlay() -> None:
    """With an overlay device, a remote backend is DNATed to, tunnel-keyed and redirected (TC_ACT_REDIRECT);
    the LB node keeps the CT_SERVICE entry only, as the seed's node A."""
    import socket
    import struct

    from lb_harness import BACKEND_F_REMOTE, BACKENDS
    from tuplet.datapath.layouts import ip_to_be32

    def with_node(bid: int, proto: int, node: str | None) -> None:   # the backend's node= address
        h.coll.maps[BACKENDS].update(bid, struct.pack("<IHBBI", ip_to_be32("10.65.0.9"), socket.htons(BP), proto,
                                                      BACKEND_F_REMOTE, ip_to_be32(node) if node else 0))

    h = LbHarness.load_both(consts={"overlay_ifindex": 1})
    try:
        h.program(Svc(LB_VIP, 80, TCP_P, 24, {24: ("10.65.0.9", BP, True)}, flags=F_EXTERNAL | F_LOADBALANCER))
        with_node(24, TCP_P, None)       # no node=: nowhere to tunnel to
        v, _ = h.run_out("cil_from_netdev", tcp4(CLIENT, 53437, LB_VIP, 80, "S"))
        assert (v.retval, v.reason) == (TC_ACT_SHOT, "DROP_REMOTE_BACKEND")
        for k in list(h.coll.maps[CT_MAP_SYN].keys()):   # its CT_SERVICE entry: start afresh
            h.coll.maps[CT_MAP_SYN].delete(k)
        with_node(24, TCP_P, "192.168.50.11")
        for flags in ("S", "A", "PA"):   # the option rides on the SYN; the key and redirect on every packet
            v, out = h.run_out("cil_from_netdev", tcp4(CLIENT, 53438, LB_VIP, 80, flags))
            assert (v.retval, v.reason) == (TC_ACT_REDIRECT, "PASS_DSR_REDIRECT")
            assert l4_of(out) == (CLIENT, 53438, "10.65.0.9", BP) and checksums_ok(out)
        recs = h.entries()
        assert [(r.proto, r.direction, r.src, r.dst) for r in recs] == [("TCP", "SVC", (CLIENT, 53438), (LB_VIP, 80))]
        assert recs[0].entry.backend_id == 24 and recs[0].entry.rev_nat_index == 24
        h.program(Svc(LB_VIP, 80, UDP_P, 25, {25: ("10.65.0.9", BP, True)}, flags=F_EXTERNAL | F_LOADBALANCER))
        with_node(25, UDP_P, "192.168.50.11")
        for _ in range(2):               # UDP: the option on every packet
            v, out = h.run_out("cil_from_netdev", udp4(CLIENT, 5000, LB_VIP, 80))
            assert (v.retval, v.reason) == (TC_ACT_REDIRECT, "PASS_DSR_REDIRECT")
            assert l4_of(out) == (CLIENT, 5000, "10.65.0.9", BP)
        assert sorted(r.direction for r in h.entries()) == ["SVC", "SVC"]
    finally:
        h.close()


@pytest.fixture
def backend_node() -> LbHarness:
    """A DSR backend node: an overlay (ifindex 1 stands in), no NIC-reachable service of its own."""
    h = LbHarness.load_both(consts={"overlay_ifindex": 1})
    yield h
    h.close()


def test_backend_node_reply_gets_the_service_address_from_the_nat_entry(backend_node: LbHarness) -> None:
    """cil_to_netdev on the backend node: a reply of a DSRInternal flow leaves from VIP:port (its NAT entry);
    without the NAT entry it is a counted drop."""
    lb = backend_node

    # As cil_from_overlay leaves them for CLIENT:53438 -> LB_POD:8000 (key in the map's own naming).
    key = CtTuple4.make(CLIENT, LB_POD, BP, 53438, TCP_P, TUPLE_F_OUT)
    lb.coll.maps[CT_MAP_TCP].update(key, CtEntry(lifetime=lb.now() + 100, dsr_internal=1, src_sec_id=2,
                                                 seen_non_syn=1))
    # nat_key_for_ct(): the reply on the wire, LB_POD:BP -> CLIENT:53438.
    nat_key = CtTuple4.make(CLIENT, LB_POD, 53438, BP, TCP_P, TUPLE_F_OUT)
    nat = Nat4Entry(to_addr=ip_to_be32(LB_VIP), to_port=socket.htons(80))
    lb.coll.maps[NAT_MAP].update(nat_key, nat)
    v, out = lb.run_out("cil_to_netdev", tcp4(LB_POD, BP, CLIENT, 53438, "PA", b"hi"))
    assert (v.retval, v.reason) == (TC_ACT_OK, "PASS_CT_REPLY")
    assert l4_of(out) == (LB_VIP, 80, CLIENT, 53438) and checksums_ok(out)
    e = lb.entry(CLIENT, LB_POD, BP, 53438, TCP_P, TUPLE_F_OUT)
    assert e.dsr_internal and e.rx_flags_seen & 0x18
    lb.coll.maps[NAT_MAP].delete(nat_key)
    v, out = lb.run_out("cil_to_netdev", tcp4(LB_POD, BP, CLIENT, 53438, "PA", b"hi"))
    assert (v.retval, v.reason) == (TC_ACT_SHOT, "DROP_REV_NAT_MISSING")
