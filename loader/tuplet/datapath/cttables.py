"""The conntrack tables, described once: name, address family, protocol class, key
layout, the other family's twin and the NAT table its entries own entries in. Every
module that handles "the CT tables" iterates :data:`CT_TABLES` (or picks by family or
class from it), and every one that handles "the NAT tables" :data:`NAT_TABLES`, so the
IPv6 tables are handled wherever the IPv4 ones are, with no per-family copies.
"""
from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass
from typing import Final

from tuplet.datapath import abi
from tuplet.datapath.layouts import CtTuple4, CtTuple6, Nat4Entry, Nat6Entry


class Family(str, enum.Enum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"


class Proto(str, enum.Enum):
    """What a table holds: TCP, non-TCP, or TCP until its handshake completes."""

    TCP = "tcp"
    ANY = "any"
    SYN = "syn"


#: Protocol class as the reference's metrics and `ct list`/`status` name it.
PROTO_LABELS: Final = {Proto.TCP: "TCP", Proto.ANY: "non-TCP", Proto.SYN: "TCP-handshake"}


@dataclass(frozen=True)
class NatTable:
    """A NAT table (bpf/lib/nat_map.h): keyed by its family's CT tuple, sized by ``nat_max``."""

    name: str
    family: Family
    key: type[CtTuple4] | type[CtTuple6]
    value: type[Nat4Entry] | type[Nat6Entry]

    @property
    def value_size(self) -> int:
        return ctypes.sizeof(self.value)


NAT_TABLES: Final = (
    NatTable(abi.NAT_MAP, Family.IPV4, CtTuple4, Nat4Entry),
    NatTable(abi.NAT6_MAP, Family.IPV6, CtTuple6, Nat6Entry),
)
NAT_BY_NAME: Final = {t.name: t for t in NAT_TABLES}
#: Every NAT table's name, IPv4 first.
NAT_NAMES: Final = tuple(t.name for t in NAT_TABLES)


@dataclass(frozen=True)
class CtTable:
    name: str
    family: Family
    proto: Proto
    key: type[CtTuple4] | type[CtTuple6]
    nat: str          # the NAT table its NAT-owning entries (nat_map.h) own entries in

    @property
    def key_size(self) -> int:
        return ctypes.sizeof(self.key)

    @property
    def tcp_only(self) -> bool:
        """Only TCP entries live here (a -p udp filter skips it)."""
        return self.proto is not Proto.ANY

    @property
    def label(self) -> str:
        return PROTO_LABELS[self.proto]

    @property
    def twin(self) -> "CtTable":
        """The table of the same class in the other family."""
        return next(t for t in CT_TABLES if t.proto is self.proto and t.family is not self.family)

    @property
    def v4(self) -> "CtTable":
        """The IPv4 table of its class: the one whose [conntrack] keys size it."""
        return self if self.family is Family.IPV4 else self.twin


CT_TABLES: Final = (
    CtTable(abi.CT_MAP_TCP, Family.IPV4, Proto.TCP, CtTuple4, abi.NAT_MAP),
    CtTable(abi.CT_MAP_ANY, Family.IPV4, Proto.ANY, CtTuple4, abi.NAT_MAP),
    CtTable(abi.CT_MAP_SYN, Family.IPV4, Proto.SYN, CtTuple4, abi.NAT_MAP),
    CtTable(abi.CT6_MAP_TCP, Family.IPV6, Proto.TCP, CtTuple6, abi.NAT6_MAP),
    CtTable(abi.CT6_MAP_ANY, Family.IPV6, Proto.ANY, CtTuple6, abi.NAT6_MAP),
    CtTable(abi.CT6_MAP_SYN, Family.IPV6, Proto.SYN, CtTuple6, abi.NAT6_MAP),
)
BY_NAME: Final = {t.name: t for t in CT_TABLES}
#: Every CT table's name, IPv4 first.
NAMES: Final = tuple(t.name for t in CT_TABLES)


def table(name: str) -> CtTable:
    """The description of CT table ``name`` (KeyError for a map that is not one)."""
    return BY_NAME[name]


def is_ct(name: str) -> bool:
    return name in BY_NAME


def names(family: Family | None = None, protos: tuple[Proto, ...] | None = None) -> tuple[str, ...]:
    """The CT tables of a family and of some classes (None: all)."""
    return tuple(t.name for t in CT_TABLES
                 if (family is None or t.family is family) and (protos is None or t.proto in protos))


def nat_table(name: str) -> NatTable:
    """The description of NAT table ``name`` (KeyError for a map that is not one)."""
    return NAT_BY_NAME[name]


def is_nat(name: str) -> bool:
    return name in NAT_BY_NAME


def owners(nat: str) -> tuple[str, ...]:
    """The CT tables whose entries own entries of NAT table ``nat``."""
    return tuple(t.name for t in CT_TABLES if t.nat == nat)


def sized_as(name: str) -> str:
    """The table whose ``[conntrack]`` key sizes ``name``: an IPv6 CT table's IPv4 twin, the
    IPv4 NAT table for both NAT tables, else ``name`` itself."""
    if name in BY_NAME:
        return BY_NAME[name].v4.name
    if name in NAT_BY_NAME:
        return NAT_TABLES[0].name
    return name


def family_of(name: str) -> Family:
    """The address family of a CT or NAT table (KeyError for another map)."""
    return BY_NAME[name].family if name in BY_NAME else NAT_BY_NAME[name].family
