"""The two address families of services, as the one map-writing code path sees them.

A service's maps are those of its family (IPv4: ``tpl_lb4_*``, IPv6: ``tpl_lb6_*``); the
service value (:class:`Lb4Service`), the Maglev outer map and the affinity value are
shared, as are the spaces of reverse-NAT indexes and backend ids (``bpf/lib/lb6_map.h``).
A :class:`Family` names a family's maps and builds its keys and values; the writer,
recovery and draining code take one and never test the family themselves.
"""
from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass
from typing import Callable

from tuplet.datapath.abi import (
    AFFINITY6_MAP,
    AFFINITY_MAP,
    BACKENDS6_MAP,
    BACKENDS_MAP,
    EP6_MAP,
    EP_MAP,
    REV_NAT6_MAP,
    REV_NAT_MAP,
    SERVICES6_MAP,
    SERVICES_MAP,
)
from tuplet.datapath.layouts import (
    Lb4AffinityKey,
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb6AffinityKey,
    Lb6Backend,
    Lb6Key,
    Lb6ReverseNat,
    be32_to_ip,
    bytes_to_ip6,
    ip6_to_bytes,
    ip_to_be32,
)
from tuplet.lb.model import ip_version

Packed = int | ctypes.Array[ctypes.c_uint8]


@dataclass(frozen=True)
class Family:
    version: int                            # 4 or 6
    services_map: str
    backends_map: str
    rev_nat_map: str
    affinity_map: str
    ep_map: str                             # local endpoints by address
    key_cls: type[Lb4Key] | type[Lb6Key]
    backend_cls: type[Lb4Backend] | type[Lb6Backend]
    rev_nat_cls: type[Lb4ReverseNat] | type[Lb6ReverseNat]
    affinity_key_cls: type[Lb4AffinityKey] | type[Lb6AffinityKey]
    pack: Callable[[str], Packed]           # an address as keys and values hold it
    unpack: Callable[[bytes], str]          # ... and back, from bytes that start with one
    pack_node: Callable[[str], Packed]      # a backend's node address (the DSR underlay)

    def key(self, address: str, port: int, proto: int, slot: int = 0) -> Lb4Key | Lb6Key:
        return self.key_cls.make(address, port, proto, slot)

    def frontend_of(self, raw: bytes) -> tuple[bytes, int]:
        """(the key with slot 0, as bytes; the slot) of a raw service-map key."""
        k = self.key_cls.from_buffer_copy(raw)
        slot = k.backend_slot
        k.backend_slot = 0
        return bytes(k), slot

    def backend(self, address: str, port: int, proto: int, flags: int,
                node: str | None) -> Lb4Backend | Lb6Backend:
        return self.backend_cls(self.pack(address), socket.htons(port), proto, flags,
                                self.pack_node(node) if node else self.pack(ZERO[self.version]))

    def rev_nat(self, address: str, port: int) -> Lb4ReverseNat | Lb6ReverseNat:
        return self.rev_nat_cls(self.pack(address), socket.htons(port), 0)


ZERO = {4: "0.0.0.0", 6: "::"}


def pack_node6(addr: str) -> Packed:
    """An IPv6 service's backend node: IPv6, or IPv4 stored IPv4-mapped (``::ffff:a.b.c.d``), which
    the datapath tunnels to over IPv4 (bpf/lib/dsr.h)."""
    return ip6_to_bytes(addr if ip_version(addr) == 6 else f"::ffff:{addr}")


V4 = Family(4, SERVICES_MAP, BACKENDS_MAP, REV_NAT_MAP, AFFINITY_MAP, EP_MAP,
            Lb4Key, Lb4Backend, Lb4ReverseNat, Lb4AffinityKey,
            ip_to_be32, lambda raw: be32_to_ip(int.from_bytes(raw[:4], "little")), ip_to_be32)
V6 = Family(6, SERVICES6_MAP, BACKENDS6_MAP, REV_NAT6_MAP, AFFINITY6_MAP, EP6_MAP,
            Lb6Key, Lb6Backend, Lb6ReverseNat, Lb6AffinityKey,
            ip6_to_bytes, lambda raw: bytes_to_ip6(raw[:16]), pack_node6)
FAMILIES = (V4, V6)


def of(address: str) -> Family:
    """The family of a service (its address) or backend."""
    return V6 if ip_version(address) == 6 else V4


def of_backend_key(key: str) -> Family:
    """The family of a registry backend key (``endpoint/protocol``; IPv6 ones bracketed)."""
    return V6 if key.startswith("[") else V4
