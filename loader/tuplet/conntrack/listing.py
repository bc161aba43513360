"""Streaming the conntrack tables through a filter, a chunk at a time, and the
``/proc/net/nf_conntrack`` line format (`tuplet ct list -o extended`).

Memory is one chunk of keys and values whatever the table's size: each batch lookup's
result is filtered with numpy and handed out before the next one is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from tuplet.bpf.maps import Map
from tuplet.conntrack import sentinels
from tuplet.conntrack.ctfilter import CtFilter, FilterLayout
from tuplet.conntrack.records import CtRecord
from tuplet.datapath import clock, cttables
from tuplet.datapath.cttables import Family
from tuplet.datapath.layouts import CtEntry

CHUNK = 2048   # a CT table with sentinels: ~3 ms a call at most (conntrack.sentinels)


@dataclass
class Chunk:
    """The matching entries of one batch lookup of one map."""

    map_name: str
    layout: FilterLayout
    keys: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def records(self) -> Iterator[CtRecord]:
        for k, v in zip(self.keys, self.values):
            yield CtRecord.decode(k.tobytes(), v.tobytes(), self.map_name)


def skip_map(name: str, flt: CtFilter) -> bool:
    """A whole table no entry of which can match (only TCP lives in the TCP tables)."""
    if cttables.table(name).tcp_only:
        return not flt.selects_proto(6)
    return flt.state is not None or flt.proto == 6


def matching(m: Map, flt: CtFilter, chunk: int = CHUNK) -> Iterator[Chunk]:
    """The entries of ``m`` that match, one chunk (copied out of the batch buffer) at a time."""
    if skip_map(m.name, flt):
        return
    layout = FilterLayout.of(m)
    for kraw, vraw, count in m.batches(chunk):
        keys = np.frombuffer(kraw, dtype=layout.key, count=count)
        values = np.frombuffer(vraw, dtype=layout.value, count=count)
        hit = flt.mask(layout, keys, values) & ~sentinels.mask(keys)
        if hit.any():
            yield Chunk(m.name, layout, keys[hit].copy(), values[hit].copy())


def count(m: Map, flt: CtFilter, chunk: int = CHUNK) -> int:
    return sum(len(c) for c in matching(m, flt, chunk))


# --- /proc/net/nf_conntrack ------------------------------------------------------------------

_PROTO_LOWER = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
#: nf_conntrack's layer-3 name and number per family; the echo request and reply types.
_L3 = {Family.IPV4: ("ipv4", 2), Family.IPV6: ("ipv6", 10)}
_ECHO = {1: (8, 0), 58: (128, 129)}


def tcp_state(e: CtEntry) -> str:
    """nf_conntrack's nearest TCP state name for a tuplet entry."""
    if e.rx_closing and e.tx_closing:
        return "CLOSE"
    if e.rx_closing or e.tx_closing:
        return "FIN_WAIT"
    return "ESTABLISHED" if e.seen_non_syn else "SYN_SENT"


def extended_line(r: CtRecord, now: int) -> str:
    """One entry as a /proc/net/nf_conntrack line (seed 001):

    ``ipv4     2 tcp      6 86385 ESTABLISHED src=A dst=B sport=P dport=Q packets=N bytes=M
    src=B dst=A sport=Q dport=P [ASSURED] mark=0 zone=0 use=1 dir=OUT``

    The timeout is the seconds left (0 once expired); the reply tuple is the original one
    reversed (a service entry's reply comes from the service address, as the pod sees it);
    ``dir=`` (``OUT``, ``IN``, ``SVC``, with ``related=1`` for a related-ICMP entry) tells
    apart the entries tuplet keeps per flow. Packets and bytes are what this entry counted.
    """
    e = r.entry
    nh = r.key.nexthdr
    name = _PROTO_LOWER.get(nh, "unknown")
    (sa, sp), (da, dp) = r.src, r.dst
    left = max(0, clock.diff(e.lifetime, now))
    state = f" {tcp_state(e)}" if nh == 6 else ""
    if nh in _ECHO:
        req, rep = _ECHO[nh]
        orig = f"src={sa} dst={da} type={req} code=0 id={sp}"
        reply = f"src={da} dst={sa} type={rep} code=0 id={sp}"
    else:
        orig = f"src={sa} dst={da} sport={sp} dport={dp}"
        reply = f"src={da} dst={sa} sport={dp} dport={sp}"
    assured = " [ASSURED]" if e.seen_non_syn else " [UNREPLIED]" if nh == 6 else ""
    rel = " related=1" if r.related else ""
    l3, l3num = _L3[r.family]
    return (f"{l3:<8} {l3num} {name:<8} {nh} {left}{state} {orig} packets={e.packets} bytes={e.bytes} "
            f"{reply}{assured} mark=0 zone=0 use=1 dir={r.direction}{rel}")
