"""Hypothesis strategies of packets for fuzzing the datapath programs (test_fuzz_progs.py).

Every strategy draws a :class:`Pkt`: the frame's bytes and whether it is well formed
(built by scapy with correct lengths and checksums, so a rewrite of it must keep the
checksums right). Addresses and ports come mostly from small pools (the pods, services
and backends the fuzz test programs), so random packets hit each other's entries and
the service paths; the rest are random.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6Unknown,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from lxc_harness import MAC_A, MAC_B

# --- what the fuzz test programs (see test_fuzz_progs.py) -----------------------------------

POD1, POD2, POD3, LB_POD = "10.64.0.36", "10.64.0.98", "10.64.0.64", "10.64.0.39"
VIP, LB_VIP, NODE_IP, CLIENT = "10.68.174.146", "172.190.0.17", "192.168.50.2", "172.191.0.1"
REMOTE_VIP, EMPTY_VIP, NOREV_VIP, AFF_VIP = "172.190.0.18", "10.68.0.50", "10.68.0.51", "10.68.0.52"
REMOTE_BACKEND = "10.65.0.9"
OUTSIDER = "198.51.100.7"

ADDRESSES = (POD1, POD2, POD3, LB_POD, VIP, LB_VIP, NODE_IP, CLIENT, REMOTE_VIP, EMPTY_VIP, NOREV_VIP,
             AFF_VIP, REMOTE_BACKEND, OUTSIDER)
PORTS = (80, 53, 30080, 8000, 5353, 9000, 40000, 40001)
TCP_FLAG_SETS = ("S", "SA", "A", "PA", "FA", "F", "R", "RA", "SF", "SR", "FPU", "")

TCP_P, UDP_P, ICMP_P = 6, 17, 1
ICMP_ERROR_TYPES = (3, 11, 12)

# IPv6: pods (endpoints in the fuzz harness), the outside, and the NIC-reachable services.
POD1_6, POD2_6, POD3_6, LB_POD_6 = "fd00:10:64::24", "fd00:10:64::62", "fd00:10:64::40", "fd00:10:64::39"
OUTSIDER_6, CLIENT_6 = "2001:db8::7", "2001:db8:191::1"
LB_VIP_6, NODE_IP_6, REMOTE_VIP_6 = "2001:db8:190::17", "2001:db8:50::2", "2001:db8:190::18"
REMOTE_BACKEND_6 = "fd00:10:65::9"
ADDRESSES6 = (POD1_6, POD2_6, POD3_6, LB_POD_6, OUTSIDER_6, CLIENT_6, LB_VIP_6, NODE_IP_6, REMOTE_VIP_6,
              REMOTE_BACKEND_6)
ICMP6_P = 58
ICMP6_ERROR_TYPES = (1, 2, 3, 4)


@dataclass(frozen=True)
class Pkt:
    data: bytes
    wellformed: bool = False
    what: str = ""

    def __repr__(self) -> str:            # what hypothesis prints for a failing example
        return f"Pkt({self.what!r}, wellformed={self.wellformed}, hex={self.data.hex()!r})"


# --- building blocks -------------------------------------------------------------------------

def inet_csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def fix_ip_csum(frame: bytearray) -> None:
    """Recompute the IPv4 header checksum in place (when the header is all there)."""
    if len(frame) < 34:
        return
    ihl = (frame[14] & 0x0F) * 4
    if ihl < 20 or len(frame) < 14 + ihl:
        return
    frame[24:26] = b"\0\0"
    frame[24:26] = inet_csum(bytes(frame[14:14 + ihl])).to_bytes(2, "big")


def with_ip_options(frame: bytes, opts: bytes) -> bytes:
    """The frame with IP options inserted after the 20-byte header (ihl, tot_len, checksum
    updated; L4 checksums do not cover options, so a well-formed frame stays so)."""
    opts = opts[:40]
    opts += b"\0" * (-len(opts) % 4)           # pad with End of Options
    if not opts:
        return frame
    out = bytearray(frame[:34] + opts + frame[34:])
    out[14] = 0x40 | (5 + len(opts) // 4)
    tot = int.from_bytes(out[16:18], "big") + len(opts)
    out[16:18] = tot.to_bytes(2, "big")
    fix_ip_csum(out)
    return bytes(out)


addresses = st.one_of(st.sampled_from(ADDRESSES),
                      st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i))))
ports = st.one_of(st.sampled_from(PORTS), st.integers(0, 65535))
tcp_flags = st.one_of(st.sampled_from(TCP_FLAG_SETS), st.integers(0, 255))
payloads = st.binary(max_size=24)


@st.composite
def l4_headers(draw, pool_ports=ports):
    """A scapy L4 layer (with payload) and a name for it."""
    kind = draw(st.sampled_from(("tcp", "udp", "icmp_echo", "icmp_error", "icmp_other")))
    pay = draw(payloads)
    if kind == "tcp":
        fl = draw(tcp_flags)
        layer = TCP(sport=draw(pool_ports), dport=draw(pool_ports), flags=fl,
                    seq=draw(st.integers(0, 2**32 - 1)), ack=draw(st.integers(0, 2**32 - 1)))
        return (layer / Raw(pay) if pay else layer), f"tcp[{fl}]"
    if kind == "udp":
        layer = UDP(sport=draw(pool_ports), dport=draw(pool_ports))
        if draw(st.booleans()):
            layer.chksum = 0                   # "no checksum"
        return layer / Raw(pay or b"u"), "udp"
    if kind == "icmp_echo":
        t = draw(st.sampled_from((0, 8)))
        return ICMP(type=t, id=draw(st.sampled_from((0, 1, 40000)) | st.integers(0, 65535)),
                    seq=draw(st.integers(0, 65535))) / Raw(pay), f"icmp{t}"
    if kind == "icmp_error":
        # An error quoting an inner IPv4 header and 8 bytes of its L4 header.
        inner = IP(src=draw(addresses), dst=draw(addresses)) / (
            TCP(sport=draw(pool_ports), dport=draw(pool_ports)) if draw(st.booleans())
            else UDP(sport=draw(pool_ports), dport=draw(pool_ports)))
        quoted = bytes(inner)[:draw(st.integers(0, 28))]
        t = draw(st.sampled_from(ICMP_ERROR_TYPES))
        return ICMP(type=t, code=draw(st.integers(0, 15))) / Raw(quoted), f"icmp_err{t}"
    t = draw(st.integers(0, 255))
    return ICMP(type=t, code=draw(st.integers(0, 255))) / Raw(pay), f"icmp_t{t}"


@st.composite
def ipv4_frames(draw, src=addresses, dst=addresses, l4=None) -> Pkt:
    """A well-formed Ethernet/IPv4 frame: TCP, UDP or ICMP (echo, errors, other types),
    sometimes with IP options or fragment bits."""
    layer, what = draw(l4 if l4 is not None else l4_headers())
    ip = IP(src=draw(src), dst=draw(dst), ttl=draw(st.integers(1, 255)), id=draw(st.integers(0, 65535)))
    frag = draw(st.sampled_from(("none", "none", "none", "mf_first", "later", "last")))
    if frag == "mf_first":
        ip.flags = "MF"
    elif frag == "later":
        ip.flags, ip.frag = "MF", draw(st.integers(1, 8191))
    elif frag == "last":
        ip.frag = draw(st.integers(1, 8191))
    if draw(st.integers(0, 3)) == 0:
        ip.flags = int(ip.flags) | 2           # DF, and sometimes the reserved bit
        if draw(st.booleans()):
            ip.flags = int(ip.flags) | 4
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / ip / layer)
    if draw(st.integers(0, 4)) == 0:
        opts = draw(st.one_of(st.binary(min_size=1, max_size=40),
                              st.integers(1, 40).map(lambda n: b"\x01" * n)))   # NOPs
        frame = with_ip_options(frame, opts)
        what += "+opts"
    if frag != "none":
        what += f"+{frag}"
    return Pkt(frame, True, what)


addresses6 = st.one_of(st.sampled_from(ADDRESSES6),
                       st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i))))


@st.composite
def l4_headers6(draw, pool_ports=ports):
    """A scapy IPv6 L4 layer (with payload) and a name for it: TCP, UDP, ICMPv6 echo,
    errors 1-4, neighbour discovery and router messages, other types."""
    kind = draw(st.sampled_from(("tcp", "udp", "echo", "error", "nd", "other")))
    if kind in ("tcp", "udp"):
        layer, what = draw(l4_headers(pool_ports).filter(lambda lw: lw[1].startswith(kind)))
        return layer, what
    pay = draw(payloads)
    if kind == "echo":
        cls = draw(st.sampled_from((ICMPv6EchoRequest, ICMPv6EchoReply)))
        return cls(id=draw(st.sampled_from((0, 1, 40000)) | st.integers(0, 65535)),
                   seq=draw(st.integers(0, 65535))) / Raw(pay), cls.__name__
    if kind == "error":
        inner = IPv6(src=draw(addresses6), dst=draw(addresses6)) / UDP(sport=draw(pool_ports),
                                                                       dport=draw(pool_ports))
        t = draw(st.sampled_from(ICMP6_ERROR_TYPES))
        return ICMPv6Unknown(type=t, code=draw(st.integers(0, 15)),
                             msgbody=b"\0\0\0\0" + bytes(inner)[:draw(st.integers(0, 48))]), f"icmp6_err{t}"
    if kind == "nd":
        layer = draw(st.sampled_from((ICMPv6ND_RS(), ICMPv6ND_RA(), ICMPv6ND_NS(tgt=POD2_6),
                                      ICMPv6ND_NA(tgt=POD1_6))))
        return layer, f"nd{layer.type}"
    t = draw(st.integers(0, 255))
    return ICMPv6Unknown(type=t, code=draw(st.integers(0, 255)), msgbody=pay), f"icmp6_t{t}"


# Extension headers (bpf/lib/packet.h walks IPV6_MAX_EXT_HDRS = 4 of them).
ext_headers = st.lists(st.sampled_from(("hop", "routing", "dest", "ah", "frag_first")), max_size=5)


def _ext(kind: str, nh: int) -> Packet:
    if kind == "hop":
        return IPv6ExtHdrHopByHop(nh=nh)
    if kind == "routing":
        return IPv6ExtHdrRouting(nh=nh, addresses=[POD2_6])
    if kind == "dest":
        return IPv6ExtHdrDestOpt(nh=nh)
    if kind == "ah":
        return AH(nh=nh, payloadlen=4, spi=1, icv=b"\0" * 12)     # 24 bytes
    return IPv6ExtHdrFragment(nh=nh, m=1, id=7)


_EXT_NH = {"hop": 0, "routing": 43, "dest": 60, "ah": 51, "frag_first": 44}


@st.composite
def ipv6_frames(draw, src=addresses6, dst=addresses6, l4=None) -> Pkt:
    """A well-formed Ethernet/IPv6 frame: TCP, UDP or ICMPv6 (echo, errors, ND, other types),
    sometimes behind extension headers (up to 5: one more than the datapath walks), or a
    non-first fragment."""
    layer, what = draw(l4 if l4 is not None else l4_headers6())
    body = bytes(layer)
    nh = {TCP: TCP_P, UDP: UDP_P}.get(type(layer), ICMP6_P)
    ip = IPv6(src=draw(src), dst=draw(dst), hlim=draw(st.integers(1, 255)))
    exts = draw(ext_headers)
    if draw(st.integers(0, 5)) == 0:
        exts = [*exts[:3], "frag_later"]
    chain: bytes = b""
    for i, kind in reversed(list(enumerate(exts))):
        if kind == "frag_later":
            hdr = IPv6ExtHdrFragment(nh=nh, offset=draw(st.integers(1, 8191)), m=draw(st.booleans()), id=7)
        else:
            hdr = _ext(kind, nh)
        chain = bytes(hdr) + chain
        nh = _EXT_NH.get(kind, 44)
    ip.nh = nh
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / ip / Raw(chain + body))
    if exts:
        what += "+" + ",".join(exts)
    # (L4 checksums over IPv6 are computed by scapy with the layer alone: a frame rewritten
    # would need them right, but IPv6 frames are never rewritten; they stay "well formed".)
    return Pkt(frame, True, what)


@st.composite
def malformed_ipv6(draw) -> Pkt:
    """A valid IPv6 frame with one field made wrong: version, payload length, an extension
    header's length, TCP data offset, or truncated at some offset."""
    base: Pkt = draw(ipv6_frames())
    b = bytearray(base.data)
    how = draw(st.sampled_from(("version", "plen", "plen_zero", "exthdr_len", "doff", "truncate", "truncate")))
    if how == "version":
        b[14] = (draw(st.integers(0, 15)) << 4) | (b[14] & 0x0F)
    elif how == "plen":
        b[18:20] = draw(st.integers(0, 65535)).to_bytes(2, "big")
    elif how == "plen_zero":
        b[18:20] = b"\0\0"                     # a jumbogram's (or BIG TCP's) payload length
    elif how == "exthdr_len":
        if b[20] in (0, 43, 60, 51) and len(b) > 55:
            b[55] = draw(st.integers(0, 255))
    elif how == "doff":
        if b[20] == TCP_P and len(b) >= 54 + 13:
            b[54 + 12] = (draw(st.integers(0, 15)) << 4) | (b[54 + 12] & 0x0F)
    else:
        b = b[:draw(st.integers(0, len(b)))]
        if len(b) >= 20 and draw(st.booleans()):   # payload length made to agree
            b[18:20] = max(0, len(b) - 54).to_bytes(2, "big")
    return Pkt(bytes(b), False, f"{base.what}/bad_{how}")


@st.composite
def malformed_ipv4(draw) -> Pkt:
    """A valid frame with one header field made wrong: ihl, version, tot_len, TCP data
    offset, or truncated at some offset."""
    base: Pkt = draw(ipv4_frames())
    b = bytearray(base.data)
    how = draw(st.sampled_from(("ihl", "version", "tot_len", "doff", "truncate", "truncate_l4", "truncate_l4")))
    ihl = (b[14] & 0x0F) * 4
    if how == "ihl":
        b[14] = (b[14] & 0xF0) | draw(st.integers(0, 15))
    elif how == "version":
        b[14] = (draw(st.integers(0, 15)) << 4) | (b[14] & 0x0F)
    elif how == "tot_len":
        b[16:18] = draw(st.sampled_from((0, 1, 19, 20, ihl - 1, len(b) - 13, 65535))
                        | st.integers(0, 65535)).to_bytes(2, "big")
    elif how == "doff":
        if b[23] == TCP_P and len(b) >= 14 + ihl + 13:
            doff = draw(st.integers(0, 5) | st.integers(0, 15))
            b[14 + ihl + 12] = (doff << 4) | (b[14 + ihl + 12] & 0x0F)
    elif how == "truncate":
        b = b[:draw(st.integers(0, len(b)))]
    else:                                      # cut inside the L4 header, tot_len made to agree
        b = b[:min(len(b), 14 + ihl + draw(st.integers(0, 20)))]
        if len(b) >= 18:
            b[16:18] = (len(b) - 14).to_bytes(2, "big")
    if draw(st.booleans()):
        fix_ip_csum(b)
    return Pkt(bytes(b), False, f"{base.what}/bad_{how}")


def _ethertype(t: int) -> int:
    return t if t != 0x0800 else 0x0801


@st.composite
def non_ipv4(draw) -> Pkt:
    """Anything but IPv4: IPv6, ARP, VLAN-tagged IPv4, random ethertypes."""
    kind = draw(st.sampled_from(("ipv6", "arp", "vlan", "raw")))
    if kind == "ipv6":
        frame = Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00::1", dst="fd00::2") / (
            TCP(sport=draw(ports), dport=draw(ports), flags="S") if draw(st.booleans())
            else UDP(sport=draw(ports), dport=draw(ports)) / Raw(b"x"))
        return Pkt(bytes(frame), False, "ipv6")
    if kind == "arp":
        return Pkt(bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=POD1, pdst=POD2)), False, "arp")
    if kind == "vlan":
        inner: Pkt = draw(ipv4_frames())
        tag = struct.pack("!HH", draw(st.integers(0, 4095)), 0x0800)
        return Pkt(inner.data[:12] + b"\x81\x00" + tag + inner.data[14:], False, f"vlan/{inner.what}")
    t = draw(st.sampled_from((0x86DD, 0x0806, 0x8100, 0x88A8, 0x0000, 0xFFFF)) | st.integers(0, 65535))
    return Pkt(bytes(Ether(src=MAC_A, dst=MAC_B, type=_ethertype(t))) + draw(st.binary(max_size=80)),
               False, f"ethertype_{_ethertype(t):#06x}")


@st.composite
def random_bytes(draw) -> Pkt:
    """Fully random bytes (0..200, shorter than an Ethernet header included), or random
    bytes behind an IPv4 ethertype (so the IPv4 parser sees garbage)."""
    if draw(st.booleans()):
        return Pkt(draw(st.binary(max_size=200)), False, "random")
    body = draw(st.binary(max_size=186))
    if body and draw(st.booleans()):
        body = bytes([0x40 | (body[0] & 0x0F)]) + body[1:]      # version 4, random ihl
    return Pkt(bytes(Ether(src=MAC_A, dst=MAC_B, type=0x0800)) + body, False, "random_ipv4")


# --- mutations -------------------------------------------------------------------------------

mutation_ops = st.lists(st.tuples(st.sampled_from(("flip", "set", "truncate", "extend")),
                                  st.integers(0, 59) | st.integers(0, 255),
                                  st.integers(0, 255)), min_size=1, max_size=4)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    """Apply byte flips, overwrites, truncations and extensions (positions biased to the
    headers: the first 60 bytes)."""
    b = bytearray(data)
    for op, pos, val in ops:
        if op == "truncate":
            del b[pos % (len(b) + 1):]
        elif op == "extend":
            b += bytes((val + i * 37) & 0xFF for i in range(pos % 64 + 1))
        elif b:
            i = pos % len(b)
            b[i] = b[i] ^ (1 << (val % 8)) if op == "flip" else val
    return bytes(b)


@st.composite
def mutated(draw, base=None) -> Pkt:
    p: Pkt = draw(base if base is not None else ipv4_frames())
    ops = draw(mutation_ops)
    out = mutate(p.data, ops)
    if draw(st.booleans()):                    # keep the IP checksum right: only the content is odd
        b = bytearray(out)
        if len(b) >= 15 and b[12:14] == b"\x08\x00":
            fix_ip_csum(b)
        out = bytes(b)
    return Pkt(out, False, f"{p.what}/mut{ops}")


# --- flows, for sequences --------------------------------------------------------------------

pool_addresses = st.sampled_from(ADDRESSES)
pool_ports = st.sampled_from(PORTS)


def flow_frames() -> st.SearchStrategy[Pkt]:
    """Well-formed frames between the pool's addresses and ports only, so a few of them
    in a row open flows, answer them, close and reopen them."""
    return ipv4_frames(src=pool_addresses, dst=pool_addresses, l4=l4_headers(pool_ports=pool_ports))


@st.composite
def aimed_frames(draw, targets: list[tuple[str, int, int]], sources=None) -> Pkt:
    """A well-formed TCP/UDP frame from one of sources (default: the pool's addresses) to
    one of targets ((address, port, proto): the services and backends), so sequences
    open, answer and close service flows. IPv6 targets take IPv6 sources."""
    dst, dport, proto = draw(st.sampled_from(targets))
    sport = draw(st.sampled_from((40000, 40001)) | pool_ports)
    if proto == TCP_P:
        fl = draw(st.sampled_from(("S", "S", "A", "PA", "FA", "R", "SA")) | tcp_flags)
        l4 = TCP(sport=sport, dport=dport, flags=fl)
        what = f"aimed tcp[{fl}]"
    else:
        l4 = UDP(sport=sport, dport=dport) / Raw(b"q")
        what = "aimed udp"
    src = draw(sources if sources is not None else pool_addresses)
    frame = Ether(src=MAC_A, dst=MAC_B) / (IPv6 if ":" in dst else IP)(src=src, dst=dst) / l4
    return Pkt(bytes(frame), True, what)


def flow_frames6() -> st.SearchStrategy[Pkt]:
    """As flow_frames, over IPv6: the pods' IPv6 addresses and the pool's ports."""
    return ipv6_frames(src=st.sampled_from(ADDRESSES6), dst=st.sampled_from(ADDRESSES6),
                       l4=l4_headers6(pool_ports=pool_ports))


def any_packet() -> st.SearchStrategy[Pkt]:
    return st.one_of(random_bytes(), ipv4_frames(), malformed_ipv4(), non_ipv4(), mutated(),
                     ipv6_frames(), malformed_ipv6(), mutated(ipv6_frames()))
