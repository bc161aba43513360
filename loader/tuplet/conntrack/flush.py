"""Delete the conntrack entries of some addresses (a pod that went away), or all of them,
and the NAT entries those entries own, in small bounded steps.

A table is read with BPF_MAP_LOOKUP_BATCH a chunk at a time (a few thousand entries),
matched with numpy, and the matching keys of that chunk deleted with
BPF_MAP_DELETE_BATCH before the next chunk is read: no system call works on more than
one chunk, so the datapath and other tasks on the CPU never wait for a whole table
(the GC's 10 ms bound; ``bench/endpoints.py`` measures the longest gap).

An entry matches when either of its addresses is one of the given ones: the pod's own
entries (CT_EGRESS, CT_INGRESS, the related-ICMP entries, CT_SERVICE entries of its
connections to services), which are also the entries of every flow with that pod.
Entries of other flows stay, expired or not (GC collects those).
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import structlog

from tuplet.bpf.maps import BatchBuffers, Map
from tuplet.conntrack.entries import EntryLayout, nat_keys_for

log = structlog.get_logger("tuplet.flush")

#: Which entries of a chunk to delete: (map name, keys, values) -> boolean mask.
Match = Callable[[str, np.ndarray, np.ndarray], np.ndarray]

#: Entries per batch lookup and delete: small enough that one system call stays far
#: below a millisecond.
CHUNK = 2048


@dataclass
class FlushResult:
    deleted: dict[str, int] = field(default_factory=dict)   # CT map -> entries deleted
    nat_deleted: int = 0
    chunks: int = 0
    longest_step_s: float = 0.0    # longest single batch lookup or delete
    duration_s: float = 0.0

    @property
    def ct_deleted(self) -> int:
        return sum(self.deleted.values())

    def to_json(self) -> dict[str, object]:
        return {"deleted": self.deleted, "ct_deleted": self.ct_deleted, "nat_deleted": self.nat_deleted,
                "chunks": self.chunks, "longest_step_s": self.longest_step_s, "duration_s": self.duration_s}

    def describe(self) -> str:
        per = ", ".join(f"{n} {c}" for n, c in self.deleted.items())
        return f"{self.ct_deleted} conntrack entries ({per}) and {self.nat_deleted} NAT entries"


def be32_array(addrs: Iterable[str]) -> np.ndarray:
    """Addresses as the u32 values a CT key holds (network byte order in memory)."""
    return np.array([int.from_bytes(socket.inet_aton(a), "little") for a in addrs], dtype=np.uint32)


class Flusher:
    """Deletes matching entries of CT maps (and the NAT entries they own) chunk by chunk."""

    def __init__(self, ct_maps: list[Map], nat: Map | None = None, chunk: int = CHUNK) -> None:
        self.ct_maps = ct_maps
        self.nat = nat
        self.chunk = max(1, chunk)
        self._layouts = {m.name: EntryLayout.of(m) for m in ct_maps}

    def flush(self, addrs: Iterable[str] | None = None) -> FlushResult:
        """Delete the entries with one of ``addrs`` as either address (None: every entry)."""
        want = None if addrs is None else be32_array(addrs)
        res = FlushResult()
        t0 = time.perf_counter()
        for m in self.ct_maps:
            res.deleted[m.name] = self._flush_map(m, want, res)
        if want is None and self.nat is not None:
            res.nat_deleted += self._clear(self.nat, res)
        res.duration_s = time.perf_counter() - t0
        log.info("conntrack flushed", addresses=None if addrs is None else sorted(addrs) or [],
                 deleted=res.deleted, nat_deleted=res.nat_deleted, chunks=res.chunks,
                 longest_step_ms=round(res.longest_step_s * 1000, 3), duration_s=round(res.duration_s, 4))
        return res

    def flush_matching(self, match: Match, what: str = "") -> FlushResult:
        """Delete the entries ``match`` selects per chunk, and the NAT entries they own."""
        res = FlushResult()
        t0 = time.perf_counter()
        for m in self.ct_maps:
            res.deleted[m.name] = self._flush_map(m, None, res, match)
        res.duration_s = time.perf_counter() - t0
        log.info("conntrack entries deleted", filter=what, deleted=res.deleted, nat_deleted=res.nat_deleted,
                 chunks=res.chunks, longest_step_ms=round(res.longest_step_s * 1000, 3),
                 duration_s=round(res.duration_s, 4))
        return res

    def _timed_lookup(self, m: Map, buf: BatchBuffers, token: bytes | None, res: FlushResult) -> tuple[int, bytes | None]:
        t = time.perf_counter()
        out = m.lookup_batch(buf, token)
        res.longest_step_s = max(res.longest_step_s, time.perf_counter() - t)
        res.chunks += 1
        return out

    def _timed_delete(self, m: Map, keys: bytes, count: int, res: FlushResult) -> int:
        t = time.perf_counter()
        n = m.delete_batch(keys, count)
        res.longest_step_s = max(res.longest_step_s, time.perf_counter() - t)
        return n

    def _flush_map(self, m: Map, want: np.ndarray | None, res: FlushResult, match: Match | None = None) -> int:
        lay = self._layouts[m.name]
        buf = m.batch_buffers(self.chunk)
        token: bytes | None = None
        deleted = 0
        while True:
            count, token = self._timed_lookup(m, buf, token, res)
            if count:
                keys = np.frombuffer(memoryview(buf.keys), dtype=lay.key, count=count)
                if match is not None:
                    values_all = np.frombuffer(memoryview(buf.values), dtype=lay.value, count=count)
                    hit = match(m.name, keys, values_all)
                else:
                    hit = np.ones(count, bool) if want is None else \
                        np.isin(keys["saddr"], want) | np.isin(keys["daddr"], want)
                if hit.any():
                    doomed = keys[hit].copy()
                    if self.nat is not None and (want is not None or match is not None):
                        values = np.frombuffer(memoryview(buf.values), dtype=lay.value, count=count)[hit].copy()
                        nat = nat_keys_for(doomed, values, lay)
                        if len(nat):
                            res.nat_deleted += self._timed_delete(self.nat, nat.tobytes(), len(nat), res)
                    deleted += self._timed_delete(m, doomed.tobytes(), len(doomed), res)
            if token is None:
                return deleted

    def _clear(self, m: Map, res: FlushResult) -> int:
        buf = m.batch_buffers(self.chunk)
        token: bytes | None = None
        deleted = 0
        while True:
            count, token = self._timed_lookup(m, buf, token, res)
            if count:
                deleted += self._timed_delete(m, buf.keys.raw[:count * m.key_size], count, res)
            if token is None:
                return deleted
