"""Python views of the structs the datapath shares with user space.

Defined once here and checked against the BTF of the built objects by
``tests/test_layouts.py`` (sizes, offsets, bitfield positions), so the C and
Python sides cannot drift apart silently.
"""
from __future__ import annotations

import ctypes
import ipaddress
import socket

# ct_entry flag word bits, in order, with the names `ct list` prints.
CT_FLAG_BITS: tuple[tuple[str, str], ...] = (
    ("rx_closing", "RxClosing"),
    ("tx_closing", "TxClosing"),
    ("reserved1", ""),
    ("lb_loopback", "LBLoopback"),
    ("seen_non_syn", "SeenNonSyn"),
    ("node_port", "NodePort"),
    ("proxy_redirect", "ProxyRedirect"),
    ("dsr_internal", "DSRInternal"),
    ("from_l7lb", "FromL7LB"),
    ("reserved2", ""),
    ("from_tunnel", "FromTunnel"),
)


class CtTuple4(ctypes.Structure):
    """struct ipv4_ct_tuple: addresses name the reply direction, ports the original."""

    _pack_ = 1
    _fields_ = [
        ("daddr", ctypes.c_uint32),   # network byte order
        ("saddr", ctypes.c_uint32),
        ("dport", ctypes.c_uint16),   # network byte order
        ("sport", ctypes.c_uint16),
        ("nexthdr", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    ]

    @classmethod
    def make(cls, daddr: str, saddr: str, dport: int, sport: int, nexthdr: int, flags: int) -> "CtTuple4":
        return cls(ip_to_be32(daddr), ip_to_be32(saddr), socket.htons(dport), socket.htons(sport),
                   nexthdr, flags)


class V6Addr(ctypes.Array[ctypes.c_uint8]):
    """union v6addr (bpf/lib/ipv6.h): 16 bytes in network order."""

    _type_ = ctypes.c_uint8
    _length_ = 16


class CtTuple6(ctypes.Structure):
    """struct ipv6_ct_tuple: as CtTuple4, with 16-byte addresses."""

    _pack_ = 1
    _fields_ = [
        ("daddr", V6Addr),
        ("saddr", V6Addr),
        ("dport", ctypes.c_uint16),   # network byte order
        ("sport", ctypes.c_uint16),
        ("nexthdr", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    ]

    @classmethod
    def make(cls, daddr: str, saddr: str, dport: int, sport: int, nexthdr: int, flags: int) -> "CtTuple6":
        return cls(ip6_to_bytes(daddr), ip6_to_bytes(saddr), socket.htons(dport), socket.htons(sport),
                   nexthdr, flags)


class CtEntry(ctypes.Structure):
    """struct ct_entry (56 bytes)."""

    _fields_ = [
        ("reserved0", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("lifetime", ctypes.c_uint32),
        *[(name, ctypes.c_uint16, 1) for name, _ in CT_FLAG_BITS],
        ("reserved3", ctypes.c_uint16, 5),
        ("rev_nat_index", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint16),
        ("tx_flags_seen", ctypes.c_uint8),
        ("rx_flags_seen", ctypes.c_uint8),
        ("src_sec_id", ctypes.c_uint32),
        ("last_tx_report", ctypes.c_uint32),
        ("last_rx_report", ctypes.c_uint32),
    ]

    @property
    def flag_word(self) -> int:
        """The flag bits as the 16-bit word `ct list` prints."""
        raw = bytes(self)[CT_FLAGS_OFFSET:CT_FLAGS_OFFSET + 2]
        return int.from_bytes(raw, "little")

    @property
    def flag_names(self) -> list[str]:
        return [label for name, label in CT_FLAG_BITS if label and getattr(self, name)]


CT_FLAGS_OFFSET = CtEntry.lifetime.offset + 4


class EndpointInfo(ctypes.Structure):
    """struct endpoint_info: value of the endpoint map, keyed by the pod's be32 address."""

    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("sec_id", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class IpcacheKey(ctypes.Structure):
    """struct ipcache_key: LPM trie key of the ipcache (prefix length, be32 address)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("addr", ctypes.c_uint32),      # network byte order
    ]


class Ipcache6Key(ctypes.Structure):
    """struct ipcache6_key: LPM trie key of the IPv6 ipcache (prefix length, address)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("addr", V6Addr),
    ]


class IpcacheInfo(ctypes.Structure):
    """struct ipcache_info: the identity of the pods behind a prefix."""

    _fields_ = [
        ("sec_id", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class Nat4Entry(ctypes.Structure):
    """struct nat4_entry: value of the NAT map (40 bytes)."""

    _fields_ = [
        ("created", ctypes.c_uint64),
        ("needs_ct", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 2),
        ("to_addr", ctypes.c_uint32),   # network byte order
        ("to_port", ctypes.c_uint16),   # network byte order
        ("pad", ctypes.c_uint16),
    ]


class Nat6Entry(ctypes.Structure):
    """struct nat6_entry: value of the IPv6 NAT map (56 bytes)."""

    _fields_ = [
        ("created", ctypes.c_uint64),
        ("needs_ct", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 2),
        ("to_addr", V6Addr),
        ("to_port", ctypes.c_uint16),   # network byte order
        ("pad", ctypes.c_uint16),
        ("pad2", ctypes.c_uint32),
    ]


class TplSignal(ctypes.Structure):
    """struct tpl_signal: one record of the datapath's signal ring buffer."""

    _fields_ = [
        ("ktime_ns", ctypes.c_uint64),
        ("kind", ctypes.c_uint32),
        ("arg", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class CtNotifyRec(ctypes.Structure):
    """struct ct_notify_rec: one conntrack event (bpf/lib/ct_notify.h)."""

    _fields_ = [
        ("ktime_ns", ctypes.c_uint64),
        ("entry", CtEntry),
        ("tuple", CtTuple4),
        ("type", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("table", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8),
        ("pad1", ctypes.c_uint16),
        ("pad2", ctypes.c_uint32),
    ]


class CtNotifyCtl(ctypes.Structure):
    """struct ct_notify_ctl: the listener flag and the datapath's rate per CPU."""

    _fields_ = [("listeners", ctypes.c_uint32), ("rate", ctypes.c_uint32)]


class CtNotifyCpu(ctypes.Structure):
    """struct ct_notify_cpu: one CPU's rate window and undelivered count."""

    _fields_ = [("window_ns", ctypes.c_uint64), ("sent", ctypes.c_uint64), ("lost", ctypes.c_uint64)]


class MetricsValue(ctypes.Structure):
    """struct metrics_value: one CPU's counters of one reason and direction."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


def ip_to_be32(addr: str) -> int:
    """An IPv4 address as the u32 whose in-memory bytes are in network order."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


def be32_to_ip(v: int) -> str:
    return str(ipaddress.IPv4Address(v.to_bytes(4, "little")))


def ip6_to_bytes(addr: str) -> V6Addr:
    """An IPv6 address as union v6addr holds it."""
    return V6Addr(*ipaddress.IPv6Address(addr).packed)


def bytes_to_ip6(v: V6Addr | bytes) -> str:
    return str(ipaddress.IPv6Address(bytes(v)))


def be16(v: int) -> int:
    """A port as stored (network order in memory) to host order, and back."""
    return socket.ntohs(v)


# --- services (bpf/lib/lb_map.h) ----------------------------------------------------------------


class Lb4Key(ctypes.Structure):
    """struct lb4_key: a service (slot 0) or one of its backend slots."""

    _fields_ = [
        ("address", ctypes.c_uint32),     # network byte order
        ("dport", ctypes.c_uint16),       # network byte order
        ("backend_slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]

    @classmethod
    def make(cls, address: str, port: int, proto: int, slot: int = 0) -> "Lb4Key":
        return cls(ip_to_be32(address), socket.htons(port), slot, proto, 0, 0)


class Lb4Service(ctypes.Structure):
    """struct lb4_service: slot 0 describes the service, other slots hold a backend id."""

    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("affinity_timeout", ctypes.c_uint32),
        ("maglev_size", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("rev_nat_index", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("bank", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class Lb4Backend(ctypes.Structure):
    """struct lb4_backend."""

    _fields_ = [
        ("address", ctypes.c_uint32),     # network byte order
        ("port", ctypes.c_uint16),        # network byte order
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("node_addr", ctypes.c_uint32),   # network byte order
    ]


class Lb4SockRevKey(ctypes.Structure):
    """struct lb4_sock_rev_key: a socket (cookie) socket LB pointed at a backend."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("address", ctypes.c_uint32),     # backend, network byte order
        ("port", ctypes.c_uint16),        # network byte order
        ("pad", ctypes.c_uint16),
    ]


class Lb4SockRevVal(ctypes.Structure):
    """struct lb4_sock_rev_val: the service address the application used."""

    _fields_ = [
        ("address", ctypes.c_uint32),     # network byte order
        ("port", ctypes.c_uint16),        # network byte order
        ("rev_nat_index", ctypes.c_uint16),
    ]


class Lb6SockRevKey(ctypes.Structure):
    """struct lb6_sock_rev_key: the IPv6 twin of :class:`Lb4SockRevKey`."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("address", V6Addr),              # backend
        ("port", ctypes.c_uint16),        # network byte order
        ("pad", ctypes.c_uint16),
        ("pad2", ctypes.c_uint32),
    ]


class Lb6SockRevVal(ctypes.Structure):
    """struct lb6_sock_rev_val: the IPv6 service address the application used."""

    _fields_ = [
        ("address", V6Addr),
        ("port", ctypes.c_uint16),        # network byte order
        ("rev_nat_index", ctypes.c_uint16),
    ]


class Lb4ReverseNat(ctypes.Structure):
    """struct lb4_reverse_nat: what a service's replies are rewritten to come from."""

    _fields_ = [
        ("address", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class Lb4MaglevKey(ctypes.Structure):
    """struct lb4_maglev_key: a service's Maglev table for one bank."""

    _fields_ = [
        ("rev_nat_index", ctypes.c_uint16),
        ("bank", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Lb4AffinityKey(ctypes.Structure):
    """struct lb4_affinity_key."""

    _fields_ = [
        ("client", ctypes.c_uint32),
        ("rev_nat_index", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class Lb6Key(ctypes.Structure):
    """struct lb6_key: as Lb4Key, with a 16-byte address."""

    _fields_ = [
        ("address", V6Addr),
        ("dport", ctypes.c_uint16),       # network byte order
        ("backend_slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]

    @classmethod
    def make(cls, address: str, port: int, proto: int, slot: int = 0) -> "Lb6Key":
        return cls(ip6_to_bytes(address), socket.htons(port), slot, proto, 0, 0)


class Lb6Backend(ctypes.Structure):
    """struct lb6_backend: as Lb4Backend, with 16-byte addresses (the node's too)."""

    _fields_ = [
        ("address", V6Addr),
        ("port", ctypes.c_uint16),        # network byte order
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("node_addr", V6Addr),
    ]


class Lb6ReverseNat(ctypes.Structure):
    """struct lb6_reverse_nat."""

    _fields_ = [
        ("address", V6Addr),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class Lb6AffinityKey(ctypes.Structure):
    """struct lb6_affinity_key."""

    _fields_ = [
        ("client", V6Addr),
        ("rev_nat_index", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class LbAffinityVal(ctypes.Structure):
    """struct lb_affinity_val."""

    _fields_ = [("last_used", ctypes.c_uint32), ("backend_id", ctypes.c_uint32)]
