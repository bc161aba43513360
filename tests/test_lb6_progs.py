"""ClusterIP over IPv6 per packet (crafted frames through BPF_PROG_TEST_RUN): a pod's packet
to an IPv6 service is DNATed to a backend with the TCP/UDP checksum (pseudo-header
included) kept right, the CT_SERVICE and CT_EGRESS entries are made in the IPv6 tables,
replies get the service address back, and a service change is atomic for new flows."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from lb_harness import checksums_ok, cli_service, flipping, ip_of, l4_of, new_flows, pinned_maps
from lxc_harness import TC_ACT_OK, LxcHarness, icmp_error, tcp, udp
from tuplet.datapath import abi
from tuplet.datapath.abi import TUPLE_F_OUT, TUPLE_F_SERVICE
from tuplet.datapath.layouts import Lb6AffinityKey, bytes_to_ip6
from tuplet.lb import writer as lb
from tuplet.lb.model import host_port

POD, VIP, PORT = "2001:db8:64::24", "2001:db8:68::a", 80
A, B, C3 = "2001:db8:64::62", "2001:db8:64::40", "2001:db8:64::74"


@pytest.fixture
def pinned(pin_root):
    h = LxcHarness.load(consts={"ct_accounting": 0})
    with pinned_maps(h, pin_root, (*abi.LB_MAPS, abi.EXTERNAL_MAP, *abi.CT_MAPS, *abi.CT6_MAPS)):
        yield h, pin_root


def program(root: str, *backends: str, m: int = 251, **kw) -> lb.ServiceTable:
    with lb.ServiceTable(root, local_addrs={A, B, C3}) as t:
        return t.upsert(cli_service(kw.pop("address", VIP), kw.pop("port", PORT), *backends, name="web6", m=m,
                                    **kw))


def run(h: LxcHarness, prog: str, frame: bytes) -> bytes:
    res = h.coll.programs[prog].test_run(frame)
    assert res.retval == TC_ACT_OK
    return res.data


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_dnat_and_reverse_nat_keep_checksums(pinned, proto) -> None:
    h, root = pinned
    v = program(root, f"[{A}]:8000", f"[{B}]:8000", protocol=proto)
    out = (lambda sport: tcp(POD, sport, VIP, PORT, "S", b"hello")) if proto == "tcp" else \
        (lambda sport: udp(POD, sport, VIP, PORT, b"hello"))
    frame = run(h, "cil_from_container", out(40000))
    src, sport, dst, dport = l4_of(frame)
    assert (src, sport, dport) == (POD, 40000, 8000) and dst in (A, B)
    assert checksums_ok(frame), ip_of(frame).show(dump=True)
    assert bytes(ip_of(frame)[TCP if proto == "tcp" else UDP].payload) == b"hello"
    # CT_SERVICE (client to the VIP) names the backend; CT_EGRESS (to the backend) inherits RevNAT.
    nh = 6 if proto == "tcp" else 17
    svc_e = h.entry(POD, VIP, PORT, 40000, nh, TUPLE_F_SERVICE)
    assert svc_e is not None and svc_e.rev_nat_index == v.rev_nat
    assert svc_e.backend_id == {b.backend.address: b.id for b in v.backends}[dst]
    egress = h.entry(POD, dst, 8000, 40000, nh, TUPLE_F_OUT)
    assert egress is not None and egress.rev_nat_index == v.rev_nat
    # The reply comes from the VIP, checksum right.
    reply = tcp(dst, 8000, POD, 40000, "SA", b"world") if proto == "tcp" else udp(dst, 8000, POD, 40000, b"world")
    back = run(h, "cil_to_container", reply)
    assert l4_of(back) == (VIP, PORT, POD, 40000)
    assert checksums_ok(back), ip_of(back).show(dump=True)
    # The same flow keeps its backend; other flows spread over both.
    assert l4_of(run(h, "cil_from_container", out(40000)))[2] == dst
    assert {l4_of(run(h, "cil_from_container", out(41000 + i)))[2] for i in range(40)} == {A, B}


def test_untouched_when_not_a_service(pinned) -> None:
    h, root = pinned
    program(root, f"[{A}]:8000")
    for frame in (tcp(POD, 40002, VIP, 81, "S"), udp(POD, 40002, VIP, PORT), tcp(POD, 40003, B, 8000, "S")):
        assert run(h, "cil_from_container", frame) == frame


def test_new_ipv6_flows_never_see_a_half_written_service(pinned) -> None:
    """Flows start continuously while the backend set and table size flip back and forth."""
    h, root = pinned
    sets = [cli_service(VIP, PORT, f"[{A}]:8000", f"[{B}]:8000", name="web6", m=251),
            cli_service(VIP, PORT, f"[{C3}]:8000", name="web6", m=257)]
    with flipping(lambda: lb.ServiceTable(root, local_addrs={A, B, C3}), sets):
        seen = new_flows(h, (tcp(POD, 1024 + i, VIP, PORT, "S") for i in range(3000)))
    assert set(seen) <= {A, B, C3} and len(seen) >= 2, seen


def test_client_affinity_over_ipv6(pinned) -> None:
    h, root = pinned
    v = program(root, *(f"[2001:db8:64::{i:x}]:8000" for i in range(0x60, 0x68)), affinity_timeout=60)
    first = l4_of(run(h, "cil_from_container", tcp(POD, 42000, VIP, PORT, "S")))[2]
    assert {l4_of(run(h, "cil_from_container", tcp(POD, 42001 + i, VIP, PORT, "S")))[2] for i in range(20)} == {first}
    (key,) = [Lb6AffinityKey.from_buffer_copy(k) for k in h.coll.maps[abi.AFFINITY6_MAP].keys()]
    assert (bytes_to_ip6(key.client), key.rev_nat_index) == (POD, v.rev_nat)
    # Another client is not bound by it.
    others = {l4_of(run(h, "cil_from_container", tcp(f"2001:db8:64::{0x100 + i:x}", 43000, VIP, PORT, "S")))[2]
              for i in range(30)}
    assert len(others) > 1



# (client, VIP, backend) by family: the ICMP error test runs for both (one body).
ICMP_FLOWS = {"ipv6": (POD, VIP, A), "ipv4": ("10.64.0.36", "10.68.174.146", "10.64.0.98")}


def checksum_fresh(pkt: Packet, layer: str, field: str) -> bool:
    """Whether pkt's checksum ``field`` of ``layer`` is what scapy computes anew (ICMPv6's
    with the IPv6 pseudo-header)."""
    fresh = type(pkt)(bytes(pkt))
    delattr(fresh[layer], field)
    return getattr(type(pkt)(bytes(fresh))[layer], field) == getattr(pkt[layer], field)


@pytest.mark.parametrize("fam", ICMP_FLOWS)
def test_icmp_error_of_a_service_flow_is_reverse_nated(pinned, fam) -> None:
    """A backend's port unreachable about a service flow's packet leaves cil_to_container from
    the VIP, quoting the packet as the client sent it (to VIP:PORT), with the ICMP(v6) checksum
    right (and a quoted IPv4 header's own); one about a direct flow to the backend is untouched."""
    h, root = pinned
    pod, vip, a = ICMP_FLOWS[fam]
    with lb.ServiceTable(root, local_addrs={a}) as t:
        t.upsert(cli_service(vip, PORT, host_port(a, 8000), name="dns", protocol="udp"))
    sent = run(h, "cil_from_container", udp(pod, 40000, vip, PORT))
    assert l4_of(sent) == (pod, 40000, a, 8000)
    err = ip_of(run(h, "cil_to_container", icmp_error(a, pod, sent)))
    assert (err.src, err.dst) == (vip, pod)
    icmp, csum = ("ICMPv6DestUnreach", "cksum") if fam == "ipv6" else ("ICMP", "chksum")
    quote = (IPv6 if fam == "ipv6" else IP)(bytes(err[icmp].payload))
    assert (quote.src, quote.dst, quote[UDP].sport, quote[UDP].dport) == (pod, vip, 40000, PORT)
    assert checksum_fresh(err, icmp, csum), err.show(dump=True)
    if fam == "ipv4":
        assert checksum_fresh(quote, "IP", "chksum"), quote.show(dump=True)
    direct = run(h, "cil_from_container", udp(pod, 40001, a, 8000))
    error = icmp_error(a, pod, direct)
    assert run(h, "cil_to_container", error) == error
