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

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import structlog

from tuplet.bpf.maps import BatchBuffers, Map
from tuplet.conntrack import sentinels
from tuplet.conntrack.ctfilter import either_address
from tuplet.conntrack.entries import EntryLayout, nat_keys_for, nat_list
from tuplet.conntrack.notify import emitter_for
from tuplet.datapath import abi, cttables, paths

log = structlog.get_logger("tuplet.flush")

#: Which entries of a chunk to delete: (map name, keys, values) -> boolean mask.
Match = Callable[[str, np.ndarray, np.ndarray], np.ndarray]

#: Reports deleted entries to event listeners: (map name, keys, values, reason) -> written
#: (:func:`tuplet.conntrack.notify.emitter_for`).
Notify = Callable[[str, np.ndarray, np.ndarray, int], int]

#: Entries per batch lookup and delete: small enough that one system call stays far
#: below a millisecond (bench/endpoints.py: the longest single call with 1,024 is
#: ~0.3 ms on a 1 Mi table).
CHUNK = 1024


@dataclass
class FlushResult:
    deleted: dict[str, int] = field(default_factory=dict)   # CT map -> entries deleted
    nat_deleted: int = 0
    chunks: int = 0
    longest_step_s: float = 0.0    # longest single batch lookup or delete
    longest_step: str = ""         # which one it was ("lookup MAP" / "delete MAP")
    longest_cpu_s: float = 0.0     # most CPU time one call used (thread time: the wall time
    duration_s: float = 0.0        # above also counts time the task was off the CPU)

    def note(self, what: str, seconds: float, cpu_s: float) -> None:
        if seconds > self.longest_step_s:
            self.longest_step_s, self.longest_step = seconds, what
        self.longest_cpu_s = max(self.longest_cpu_s, cpu_s)

    @property
    def ct_deleted(self) -> int:
        return sum(self.deleted.values())

    def to_json(self) -> dict[str, object]:
        return {"deleted": self.deleted, "ct_deleted": self.ct_deleted, "nat_deleted": self.nat_deleted,
                "chunks": self.chunks, "longest_step_s": self.longest_step_s, "longest_step": self.longest_step,
                "longest_cpu_s": self.longest_cpu_s,
                "duration_s": self.duration_s}

    def describe(self) -> str:
        per = ", ".join(f"{n} {c}" for n, c in self.deleted.items())
        return f"{self.ct_deleted} conntrack entries ({per}) and {self.nat_deleted} NAT entries"


def address_match(addrs: Iterable[str]) -> Match:
    """Entries with one of ``addrs`` (IPv4 or IPv6; each table holds its family's) as either address."""
    want = tuple(addrs)

    def match(_map: str, keys: np.ndarray, _values: np.ndarray) -> np.ndarray:
        return either_address(keys, want)
    return match


class Flusher:
    """Deletes matching entries of CT maps (and the NAT entries they own, in the NAT maps
``nat``: one, several or none) chunk by chunk.

    The one chunked delete of the project: `tuplet ct flush` (every entry) and an
    endpoint's delete (its addresses) both run it. Between two chunks the flusher gives
    the CPU away (``os.sched_yield``), so a task sharing the CPU waits for at most one
    system call.
    """

    def __init__(self, ct_maps: list[Map], nat: Map | Sequence[Map] | None = None, chunk: int = CHUNK,
                 yield_cpu: bool = True, notify: Notify | None = None,
                 reason: int = abi.CT_NOTIFY_R_FLUSH) -> None:
        self.ct_maps = ct_maps
        self.notify = notify
        self.reason = reason
        self.nats = {m.name: m for m in nat_list(nat)}
        self.chunk = max(1, chunk)
        self.yield_cpu = yield_cpu
        self._layouts = {m.name: EntryLayout.of(m) for m in ct_maps}

    def flush(self, addrs: Iterable[str] | None = None) -> FlushResult:
        """Delete the entries with one of ``addrs`` as either address (None: every entry,
        and the whole NAT tables)."""
        match = None if addrs is None else address_match(addrs)
        res = FlushResult()
        t0 = time.perf_counter()
        for m in self.ct_maps:
            res.deleted[m.name] = self._flush_map(m, match, res)
        if match is None:
            for nat in self.nats.values():
                res.nat_deleted += sum(self._delete(nat, buf.keys.raw[:count * nat.key_size], count, res)
                                       for buf, count in self._chunks(nat, res))
        res.duration_s = time.perf_counter() - t0
        log.info("conntrack flushed", addresses=None if addrs is None else sorted(addrs) or [],
                 deleted=res.deleted, nat_deleted=res.nat_deleted, chunks=res.chunks,
                 longest_step_ms=round(res.longest_step_s * 1000, 3), longest_step=res.longest_step,
                 duration_s=round(res.duration_s, 4))
        return res

    def flush_matching(self, match: Match, what: str = "") -> FlushResult:
        """Delete the entries ``match`` selects per chunk, and the NAT entries they own."""
        res = FlushResult()
        t0 = time.perf_counter()
        for m in self.ct_maps:
            res.deleted[m.name] = self._flush_map(m, match, res)
        res.duration_s = time.perf_counter() - t0
        log.info("conntrack entries deleted", filter=what, deleted=res.deleted, nat_deleted=res.nat_deleted,
                 chunks=res.chunks, longest_step_ms=round(res.longest_step_s * 1000, 3),
                 duration_s=round(res.duration_s, 4))
        return res

    def _chunks(self, m: Map, res: FlushResult) -> Iterator[tuple[BatchBuffers, int]]:
        """``m`` a batch lookup at a time (each one timed), the CPU given away between."""
        buf = m.batch_buffers(self.chunk)
        steps = m.lookup_chunks(buf)
        while True:
            t, c = time.perf_counter(), time.thread_time()
            count = next(steps, 0)
            res.note(f"lookup {m.name}", time.perf_counter() - t, time.thread_time() - c)
            if not count:
                return
            res.chunks += 1
            yield buf, count
            if self.yield_cpu:
                os.sched_yield()

    def _delete(self, m: Map, keys: bytes, count: int, res: FlushResult) -> int:
        t, c = time.perf_counter(), time.thread_time()
        n = m.delete_batch(keys, count)
        res.note(f"delete {m.name}", time.perf_counter() - t, time.thread_time() - c)
        return n

    def _flush_map(self, m: Map, match: Match | None, res: FlushResult) -> int:
        """Delete the entries of ``m`` that ``match`` selects (None: every entry)."""
        lay = self._layouts[m.name]
        deleted = 0
        for buf, count in self._chunks(m, res):
            keys = np.frombuffer(memoryview(buf.keys), dtype=lay.key, count=count)
            values = np.frombuffer(memoryview(buf.values), dtype=lay.value, count=count)
            hit = np.ones(count, bool) if match is None else match(m.name, keys, values)
            hit &= ~sentinels.mask(keys)   # never deleted: they bound the table's empty runs
            if not hit.any():
                continue
            doomed = keys[hit].copy()
            # All entries: flush() empties the NAT tables. Else the owned ones, in the table's own.
            nat_map = self.nats.get(cttables.table(m.name).nat)
            if nat_map is not None and match is not None:
                nat = nat_keys_for(doomed, values[hit].copy(), lay)
                if len(nat):
                    res.nat_deleted += self._delete(nat_map, nat.tobytes(), len(nat), res)
            n = self._delete(m, doomed.tobytes(), len(doomed), res)
            deleted += n
            if self.notify is not None:   # a batch delete stops at its first failure: the first n went
                self.notify(m.name, doomed[:n], values[hit][:n], self.reason)
        return deleted


def flush_pinned(pin_root: str, addrs: Iterable[str] | None = None, chunk: int = CHUNK,
                 reason: int = abi.CT_NOTIFY_R_FLUSH) -> FlushResult:
    """Flush the pinned CT tables of ``pin_root`` (and its NAT tables): the entries of
    ``addrs``, or everything (None). Listeners of ``ct events`` get DESTROY with ``reason``."""
    with ExitStack() as stack:
        maps = paths.open_present(pin_root, cttables.NAMES, stack)
        nat = paths.open_present(pin_root, cttables.NAT_NAMES, stack)
        notify = emitter_for(pin_root, stack, paths.object_dir() / abi.OBJ_GC)
        return Flusher(maps, nat, chunk=chunk, notify=notify, reason=reason).flush(addrs)
