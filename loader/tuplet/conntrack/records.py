"""Reading the conntrack tables and printing them like the reference's `ct list`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from tuplet.bpf.maps import Map
from tuplet.conntrack.sentinels import READ_CHUNK
from tuplet.datapath import clock, cttables
from tuplet.datapath.abi import TUPLE_F_IN, TUPLE_F_RELATED, TUPLE_F_SENTINEL, TUPLE_F_SERVICE
from tuplet.datapath.cttables import Family
from tuplet.datapath.layouts import CtEntry, CtTuple4, CtTuple6, V6Addr, be16, be32_to_ip, bytes_to_ip6

PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}


@dataclass(frozen=True)
class CtRecord:
    """One conntrack entry, decoded."""

    key: CtTuple4 | CtTuple6
    entry: CtEntry
    map_name: str

    @classmethod
    def decode(cls, key: bytes, value: bytes, map_name: str) -> "CtRecord":
        """An entry of CT table ``map_name`` from its raw key and value."""
        return cls(cttables.table(map_name).key.from_buffer_copy(key), CtEntry.from_buffer_copy(value), map_name)

    @property
    def family(self) -> Family:
        return Family.IPV6 if isinstance(self.key, CtTuple6) else Family.IPV4

    @staticmethod
    def _addr(v: int | V6Addr) -> str:
        return be32_to_ip(v) if isinstance(v, int) else bytes_to_ip6(v)

    @property
    def proto(self) -> str:
        return PROTO_NAMES.get(self.key.nexthdr, str(self.key.nexthdr))

    @property
    def direction(self) -> str:
        f = self.key.flags
        if f & TUPLE_F_SERVICE:
            return "SVC"
        return "IN" if f & TUPLE_F_IN else "OUT"

    @property
    def related(self) -> bool:
        return bool(self.key.flags & TUPLE_F_RELATED)

    @property
    def src(self) -> tuple[str, int]:
        """The flow's original source (the key's daddr and sport)."""
        return self._addr(self.key.daddr), be16(self.key.sport)

    @property
    def dst(self) -> tuple[str, int]:
        """The flow's original destination (the key's saddr and dport)."""
        return self._addr(self.key.saddr), be16(self.key.dport)

    def hostport(self, addr: str, port: int) -> str:
        """``addr:port``, the address in brackets for IPv6 (as the reference prints it)."""
        return f"[{addr}]:{port}" if self.family is Family.IPV6 else f"{addr}:{port}"

    def line(self, now: int | None = None) -> str:
        """The reference's one-line format; with ``now``, the remaining seconds too."""
        e = self.entry
        (sa, sp), (da, dp) = self.src, self.dst
        out = f"{self.proto} {self.direction} {self.hostport(sa, sp)} -> {self.hostport(da, dp)} "
        if self.related:
            out += "related "
        out += f"expires={e.lifetime}"
        if now is not None:
            out += f" (remaining: {clock.diff(e.lifetime, now)} sec(s))"
        names = "".join(n + " " for n in e.flag_names)
        out += (f" Packets={e.packets} Bytes={e.bytes}"
                f" RxFlagsSeen=0x{e.rx_flags_seen:02x} LastRxReport={e.last_rx_report}"
                f" TxFlagsSeen=0x{e.tx_flags_seen:02x} LastTxReport={e.last_tx_report}"
                f" Flags=0x{e.flag_word:04x} [ {names}]"
                f" RevNAT={e.rev_nat_index} SourceSecurityID={e.src_sec_id}"
                f" IfIndex={e.ifindex} BackendID={e.backend_id}")
        return out

    def to_json(self, now: int | None = None) -> dict[str, Any]:
        e = self.entry
        (sa, sp), (da, dp) = self.src, self.dst
        rec: dict[str, Any] = {
            "map": self.map_name, "family": self.family.value, "proto": self.proto, "direction": self.direction,
            "related": self.related, "src": sa, "sport": sp, "dst": da, "dport": dp,
            "expires": e.lifetime, "packets": e.packets, "bytes": e.bytes,
            "rx_flags_seen": e.rx_flags_seen, "last_rx_report": e.last_rx_report,
            "tx_flags_seen": e.tx_flags_seen, "last_tx_report": e.last_tx_report,
            "flags": e.flag_word, "flag_names": e.flag_names, "rev_nat": e.rev_nat_index,
            "source_security_id": e.src_sec_id, "ifindex": e.ifindex, "backend_id": e.backend_id,
        }
        if now is not None:
            rec["remaining"] = clock.diff(e.lifetime, now)
        return rec


def records(m: Map) -> Iterator[CtRecord]:
    """Every entry of one CT map, read in batches (not the sentinels, see conntrack.sentinels)."""
    for k, v in m.items(READ_CHUNK):
        r = CtRecord.decode(k, v, m.name)
        if not r.key.flags & TUPLE_F_SENTINEL:
            yield r


def sort_key(r: CtRecord) -> tuple[Any, ...]:
    return (r.proto, r.src, r.dst, r.direction, r.related)
