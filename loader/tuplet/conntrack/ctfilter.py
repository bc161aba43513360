"""Which conntrack entries a `tuplet ct list|delete` filter selects, decided with numpy over
one batch of raw keys and values at a time (as conntrack's -s/-d/-p/--sport/--dport).

Pure: a :class:`CtFilter` and a :class:`FilterLayout` (where the fields live, from the
map's BTF) turn a chunk of keys and values into a boolean mask; nothing is kept between
chunks, so a table of any size is filtered with the memory of one chunk.

Naming as ``tuplet ct list`` prints a flow: the *source* is the flow's original source
(the key's ``daddr`` and ``sport``), the *destination* its original destination (the
key's ``saddr`` and ``dport``).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from tuplet.bpf.btf_layout import BitField, numpy_dtype, struct_layout
from tuplet.bpf.maps import Map
from tuplet.core import hostport
from tuplet.core.errors import ConfigError, TupletError
from tuplet.datapath.abi import TUPLE_F_IN, TUPLE_F_SERVICE

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TYPES = ("OUT", "IN", "SVC")
STATES = ("syn", "established", "closing")
STATE_BITS = ("rx_closing", "tx_closing", "seen_non_syn")


@dataclass(frozen=True)
class FilterLayout:
    """The key and value dtypes of a CT map and where the state bits are."""

    key: np.dtype[Any]
    value: np.dtype[Any]
    bits: dict[str, BitField] = field(default_factory=dict)   # rx_closing, tx_closing, seen_non_syn

    @classmethod
    def of(cls, m: Map) -> "FilterLayout":
        with m.btf() as btf:
            key = numpy_dtype(btf, m.info.btf_key_type_id)
            value = numpy_dtype(btf, m.info.btf_value_type_id)
            bits = {b.name: b for b in struct_layout(btf, m.info.btf_value_type_id).bitfields}
        missing = [n for n in STATE_BITS if n not in bits]
        if key.itemsize != m.key_size or value.itemsize != m.value_size or missing \
                or "rev_nat_index" not in (value.names or ()):
            raise TupletError(m.what, "filter", detail="BTF layout is not a conntrack entry "
                              f"(missing {missing or 'rev_nat_index'})")
        return cls(key, value, {n: bits[n] for n in STATE_BITS})

    def state_bits(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {n: np.asarray(b.get(values)) != 0 for n, b in self.bits.items()}


def addr_bytes(keys: np.ndarray, name: str) -> np.ndarray:
    """Field ``name`` (an IPv4 or IPv6 address, network order in memory) of each key as
    rows of bytes: (n, 4) or (n, 16), whatever the field's dtype."""
    dt, off = keys.dtype.fields[name][:2]   # type: ignore[index]
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), keys.dtype.itemsize)
    out: np.ndarray = raw[:, off:off + dt.itemsize]
    return out


def either_address(keys: np.ndarray, addrs: Iterable[str]) -> np.ndarray:
    """Which keys have one of ``addrs`` (either family) as either address."""
    sa, da = addr_bytes(keys, "saddr"), addr_bytes(keys, "daddr")
    hit = np.zeros(len(keys), bool)
    for a in map(ipaddress.ip_address, addrs):
        hit |= _is(sa, a) | _is(da, a)
    return hit


def _is(rows: np.ndarray, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> np.ndarray:
    """Which address rows are ``addr`` (none when the families differ)."""
    if rows.shape[1] != len(addr.packed):
        return np.zeros(len(rows), bool)
    out: np.ndarray = (rows == np.frombuffer(addr.packed, np.uint8)).all(axis=1)
    return out


def host_u16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.uint16).byteswap()


def entry_type(flags: np.ndarray) -> np.ndarray:
    """0 OUT, 1 IN, 2 SVC per key flags (the related bit does not change the type)."""
    return np.where((flags & TUPLE_F_SERVICE) != 0, 2, np.where((flags & TUPLE_F_IN) != 0, 1, 0))


def entry_state(layout: FilterLayout, values: np.ndarray) -> np.ndarray:
    """0 syn, 1 established, 2 closing (meaningful for TCP entries)."""
    b = layout.state_bits(values)
    closing = b["rx_closing"] | b["tx_closing"]
    return np.where(closing, 2, np.where(b["seen_non_syn"], 1, 0))


@dataclass(frozen=True)
class CtFilter:
    """A conjunction of conditions; None (or empty) means "any"."""

    src: Network | None = None
    dst: Network | None = None
    proto: int | None = None
    sport: int | None = None
    dport: int | None = None
    type: str | None = None                  # OUT | IN | SVC
    state: str | None = None                 # syn | established | closing (TCP only)
    addrs: tuple[str, ...] | None = None     # --endpoint: either address (IPv4 or IPv6) is one of these
    rev_nat: int | None = None               # --service: the entry carries this rev-NAT index

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__dataclass_fields__)

    def selects_proto(self, proto: int) -> bool:
        """Could entries of this protocol match (lets a caller skip whole tables)?"""
        if self.state is not None and proto != PROTOS["tcp"]:
            return False
        return self.proto is None or self.proto == proto

    def mask(self, layout: FilterLayout, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Which of these keys/values (numpy arrays of layout.key/value) match."""
        hit = np.ones(len(keys), bool)
        if self.src is not None:
            hit &= _in_net(keys, "daddr", self.src)
        if self.dst is not None:
            hit &= _in_net(keys, "saddr", self.dst)
        if self.proto is not None:
            hit &= keys["nexthdr"] == self.proto
        if self.sport is not None:
            hit &= host_u16(keys["sport"]) == self.sport
        if self.dport is not None:
            hit &= host_u16(keys["dport"]) == self.dport
        if self.type is not None:
            hit &= entry_type(keys["flags"]) == TYPES.index(self.type)
        if self.state is not None:
            hit &= (keys["nexthdr"] == PROTOS["tcp"]) & (entry_state(layout, values) == STATES.index(self.state))
        if self.addrs is not None:
            hit &= either_address(keys, self.addrs)
        if self.rev_nat is not None:
            hit &= values["rev_nat_index"] == self.rev_nat
        return hit


def _in_net(keys: np.ndarray, name: str, net: Network) -> np.ndarray:
    """Which keys' address ``name`` is in ``net`` (none when the families differ)."""
    rows = addr_bytes(keys, name)
    if rows.shape[1] != len(net.network_address.packed):
        return np.zeros(len(keys), bool)
    mask = np.frombuffer(net.netmask.packed, np.uint8)
    r: np.ndarray = ((rows & mask) == np.frombuffer(net.network_address.packed, np.uint8)).all(axis=1)
    return r


# --- parsing the command line's values (errors name the flag) --------------------------------

def parse_net_port(flag: str, text: str) -> tuple[Network, int | None]:
    """An address or prefix with an optional port, as `ct list` prints one: ``10.64.0.36``,
    ``10.64.0.0/16``, ``10.64.0.36:80``, ``f00d::/64``, ``[f00d::24]``, ``[f00d::24]:80``."""
    addr, port = hostport.parse(text, flag, prefix=True)
    return ipaddress.ip_network(addr, strict=False), port


def parse_net(flag: str, text: str) -> Network:
    net, port = parse_net_port(flag, text)
    if port is not None:
        raise ConfigError(flag, f"must be an address or prefix without a port, got {text!r}")
    return net


def parse_proto(flag: str, text: str) -> int:
    t = text.lower()
    if t in PROTOS:
        return PROTOS[t]
    if t.isdigit() and 0 <= int(t) <= 255:
        return int(t)
    raise ConfigError(flag, f"must be tcp, udp, icmp, icmpv6 or a protocol number, got {text!r}")


def parse_port(flag: str, text: str) -> int:
    if text.isdigit() and 0 <= int(text) <= 65535:
        return int(text)
    raise ConfigError(flag, f"must be a port number (0 to 65535), got {text!r}")


def parse_type(flag: str, text: str) -> str:
    if text.upper() in TYPES:
        return text.upper()
    raise ConfigError(flag, f"must be one of {', '.join(TYPES)}, got {text!r}")


def parse_state(flag: str, text: str) -> str:
    if text.lower() in STATES:
        return text.lower()
    raise ConfigError(flag, f"must be one of {', '.join(STATES)}, got {text!r}")
