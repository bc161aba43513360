"""Who fills the table: the top sources, destinations (address:port), services and
endpoints by entries held now (a streamed walk of the tables) and by new entries per
second over an interval (counted from `ct events` records).

Memory stays bounded on any table: each chunk is reduced with ``np.unique`` to
(value, count) pairs, pairs are merged every ``MERGE_EVERY`` chunks, and a counter that
grows past ``cap`` distinct values keeps its ``cap // 2`` largest. Pruning makes counts
lower bounds, by at most the largest count it dropped (:attr:`Counter.error`); with
fewer distinct values than ``cap`` (the usual case: 1 Mi) the counts are exact.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from tuplet.bpf.maps import Map
from tuplet.conntrack.ctfilter import CtFilter, addr_bytes
from tuplet.conntrack.listing import CHUNK, matching

CAP = 1 << 20
MERGE_EVERY = 64
CATEGORIES = ("sources", "destinations", "services", "endpoints")
#: Addresses of both families are counted as 16 bytes (an IPv4 one IPv4-mapped, ::ffff:a.b.c.d),
#: a destination as its address and port (network order): one counter per category.
ADDR = np.dtype("V16")
ADDR_PORT = np.dtype("V18")
_V4_MAPPED = np.frombuffer(bytes(10) + b"\xff\xff", np.uint8)
DTYPES = {"sources": ADDR, "destinations": ADDR_PORT, "services": np.dtype(np.uint64), "endpoints": ADDR}


def addr16(addr: str) -> bytes:
    """An address of either family as the counters hold it."""
    a = ipaddress.ip_address(addr)
    return a.packed if a.version == 6 else _V4_MAPPED.tobytes() + a.packed


def _addr16(rows: np.ndarray) -> np.ndarray:
    """Address rows of bytes ((n, 4) or (n, 16)) as ADDR values."""
    if rows.shape[1] == 4:
        rows = np.hstack([np.broadcast_to(_V4_MAPPED, (len(rows), 12)), rows])
    return np.ascontiguousarray(rows).view(ADDR).reshape(len(rows))


def _addr_label(v: bytes) -> str:
    a = ipaddress.IPv6Address(v)
    return str(a.ipv4_mapped or a)


@dataclass
class Counter:
    """Counts of values of one dtype (integers, or fixed-size byte strings), bounded to
    ``cap`` distinct ones."""

    cap: int = CAP
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.uint64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    error: int = 0                      # the largest count pruned away (0: exact)
    _parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.values = self.values.astype(self.dtype)

    def add(self, v: np.ndarray) -> None:
        if len(v):
            u, c = np.unique(v.astype(self.dtype), return_counts=True)
            self._parts.append((u, c.astype(np.int64)))
            if len(self._parts) >= MERGE_EVERY:
                self._merge()

    def _merge(self) -> None:
        if not self._parts:
            return
        vals = np.concatenate([self.values, *(p[0] for p in self._parts)])
        cnts = np.concatenate([self.counts, *(p[1] for p in self._parts)])
        self._parts.clear()
        u, inv = np.unique(vals, return_inverse=True)
        self.values, self.counts = u, np.bincount(inv, weights=cnts, minlength=len(u)).astype(np.int64)
        if len(self.values) > self.cap:
            keep = np.argpartition(-self.counts, self.cap // 2)[:self.cap // 2]
            dropped = np.ones(len(self.values), bool)
            dropped[keep] = False
            self.error = max(self.error, int(self.counts[dropped].max()))
            self.values, self.counts = self.values[keep], self.counts[keep]

    def top(self, n: int) -> list[tuple[int | bytes, int]]:
        self._merge()
        order = np.lexsort((self.values, -self.counts))[:n]
        return [(self.values[i].item(), int(self.counts[i])) for i in order]


@dataclass
class Tally:
    """The four counters, fed with chunks of keys and values."""

    endpoints: np.ndarray                 # endpoint addresses (ADDR, see addr16)
    cap: int = CAP
    total: int = 0
    by: dict[str, Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by = {c: Counter(self.cap, DTYPES[c]) for c in CATEGORIES}

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """keys/values: numpy records of a CT map (ct list's layout)."""
        self.total += len(keys)
        src = _addr16(addr_bytes(keys, "daddr"))     # the flow's original source
        dst = _addr16(addr_bytes(keys, "saddr"))
        self.by["sources"].add(src)
        dport = addr_bytes(keys, "dport")            # network order, as stored
        self.by["destinations"].add(np.hstack([dst.view(np.uint8).reshape(-1, 16), dport]).view(ADDR_PORT)
                                    .reshape(len(keys)))
        rev = values["rev_nat_index"]
        self.by["services"].add(rev[rev != 0])
        if len(self.endpoints):
            self.by["endpoints"].add(np.concatenate([src[np.isin(src, self.endpoints)],
                                                     dst[np.isin(dst, self.endpoints)]]))

    def top(self, n: int) -> dict[str, list[tuple[int | bytes, int]]]:
        return {c: self.by[c].top(n) for c in CATEGORIES}


def held(maps: Iterable[Map], flt: CtFilter, endpoints: np.ndarray, chunk: int = CHUNK, cap: int = CAP) -> Tally:
    """Entries held now in ``maps`` (those ``flt`` selects), one batch at a time."""
    t = Tally(endpoints, cap)
    for m in maps:
        for c in matching(m, flt, chunk):
            t.add(c.keys, c.values)
    return t


def label(category: str, v: int | bytes, services: dict[int, str], endpoints: dict[bytes, str]) -> str:
    if isinstance(v, int):
        return f"{services.get(v, '?')} (rev-NAT {v})"
    if category == "sources":
        return _addr_label(v)
    if category == "destinations":
        a, port = _addr_label(v[:16]), int.from_bytes(v[16:], "big")
        return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"
    return f"{endpoints.get(v, '?')} {_addr_label(v)}"


def to_json(t: Tally, n: int, services: dict[int, str], endpoints: dict[bytes, str],
            per_second: float = 1.0) -> dict[str, Any]:
    return {"entries": t.total, **{c: [{"name": label(c, v, services, endpoints),
                                        "count": round(k / per_second, 3)} for v, k in rows]
                                   for c, rows in t.top(n).items()},
            "exact": all(c.error == 0 for c in t.by.values())}
