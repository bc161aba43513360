"""The conntrack tables, described once: name, address family, protocol class, key
layout, and the other family's twin. Every module that handles "the CT tables" iterates
:data:`CT_TABLES` (or picks by family or class from it), so the IPv6 tables are handled
wherever the IPv4 ones are, with no per-family copies.
"""
from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass
from typing import Final

from tuplet.datapath import abi
from tuplet.datapath.layouts import CtTuple4, CtTuple6


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
class CtTable:
    name: str
    family: Family
    proto: Proto
    key: type[CtTuple4] | type[CtTuple6]

    @property
    def key_size(self) -> int:
        return ctypes.sizeof(self.key)

    @property
    def tcp_only(self) -> bool:
        """Only TCP entries live here (a -p udp filter skips it)."""
        return self.proto is not Proto.ANY

    @property
    def owns_nat(self) -> bool:
        """Its entries can own NAT entries (the NAT table is IPv4)."""
        return self.family is Family.IPV4

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
    CtTable(abi.CT_MAP_TCP, Family.IPV4, Proto.TCP, CtTuple4),
    CtTable(abi.CT_MAP_ANY, Family.IPV4, Proto.ANY, CtTuple4),
    CtTable(abi.CT_MAP_SYN, Family.IPV4, Proto.SYN, CtTuple4),
    CtTable(abi.CT6_MAP_TCP, Family.IPV6, Proto.TCP, CtTuple6),
    CtTable(abi.CT6_MAP_ANY, Family.IPV6, Proto.ANY, CtTuple6),
    CtTable(abi.CT6_MAP_SYN, Family.IPV6, Proto.SYN, CtTuple6),
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
