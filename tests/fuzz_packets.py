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
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

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
    open, answer and close service flows."""
    dst, dport, proto = draw(st.sampled_from(targets))
    sport = draw(st.sampled_from((40000, 40001)) | pool_ports)
    if proto == TCP_P:
        fl = draw(st.sampled_from(("S", "S", "A", "PA", "FA", "R", "SA")) | tcp_flags)
        l4 = TCP(sport=sport, dport=dport, flags=fl)
        what = f"aimed tcp[{fl}]"
    else:
        l4 = UDP(sport=sport, dport=dport) / Raw(b"q")
        what = "aimed udp"
    frame = Ether(src=MAC_A, dst=MAC_B) / IP(src=draw(sources if sources is not None else pool_addresses),
                                             dst=dst) / l4
    return Pkt(bytes(frame), True, what)


def any_packet() -> st.SearchStrategy[Pkt]:
    return st.one_of(random_bytes(), ipv4_frames(), malformed_ipv4(), non_ipv4(), mutated())
