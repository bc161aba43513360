"""Conntrack garbage collection: one pass over the CT maps and the NAT entries they own
(each CT table's in its family's NAT table, :mod:`tuplet.datapath.cttables`).

No part of a pass holds a CPU for long: every step is one small system call (README,
"Garbage collection", has the measured holds). Two ways to run it, with the same result:

``kernel`` (the default when the kernel accepts iterator programs)
    bpf/ct_gc_iter.c's ``iter/bpf_map_elem`` program for the map, read in slices of
    ``slice`` entries (:class:`tuplet.conntrack.gc_progs.IterPass`). Nothing but one
    verdict byte per entry reaches user space.

``batch`` (the fallback, e.g. where iterator programs are refused)
    BPF_MAP_LOOKUP_BATCH in chunks of ``chunk`` entries, expiry judged with numpy over
    the raw chunk (dtypes from the map's own BTF), the expired keys with the lifetime
    seen for each handed to bpf/ct_gc.c's ``tpl_ct_gc_keys``
    (:class:`tuplet.conntrack.gc_progs.KeyDeleter`).

Either way the delete is decided and done inside one BPF program run: the program
deletes an entry only if its lifetime, re-read as the last step before the delete, is
still the one judged expired, and deletes the NAT entry it owned after it.

With ``count_nat`` a pass also counts the NAT tables' entries (in bounded batch
lookups). The pass's result then has every table's fill for :mod:`tuplet.conntrack.pressure`.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import structlog

from tuplet.bpf.maps import Map
from tuplet.conntrack import sentinels
from tuplet.conntrack.entries import EntryLayout, expired, nat_list
from tuplet.conntrack.gc_progs import GcSwitches, IterPass, KeyDeleter, StallGate, load_on, rec_dtype
from tuplet.core.errors import TupletError
from tuplet.datapath import cttables
from tuplet.datapath.abi import (
    GC_ITER_PROGRAM,
    GC_NAT_SELECTOR,
    GC_SELECTOR,
    GC_V_ALIVE,
    GC_V_COUNTED,
    GC_V_DELETED,
    GC_V_DELETED_NAT,
    GC_V_GONE,
    GC_V_REFRESHED,
    OBJ_GC,
    OBJ_GC_ITER,
)
from tuplet.datapath.clock import U32, monotonic_now
from tuplet.datapath.paths import object_dir

log = structlog.get_logger("tuplet.gc")

# Entries per batch lookup and per iterator read: each is one system call whose time,
# the CPU held without a chance to reschedule, grows with it (README has the figures).
DEFAULT_CHUNK = 2048
DEFAULT_SLICE = 4096


class Method(str, enum.Enum):
    AUTO = "auto"
    KERNEL = "kernel"
    BATCH = "batch"


@dataclass
class MapGcStats:
    map: str
    alive: int = 0
    deleted: int = 0
    nat_deleted: int = 0
    kept_refreshed: int = 0   # expired when judged, refreshed by the datapath before the delete
    gone: int = 0             # expired when judged, deleted by someone else before the delete
    max_entries: int = 0
    duration: float = 0.0


@dataclass
class NatCount:
    """A NAT table's entries after a pass (``count_nat``)."""

    map: str
    entries: int
    max_entries: int


@dataclass
class GcResult:
    method: str = ""
    maps: list[MapGcStats] = field(default_factory=list)
    duration: float = 0.0
    nat_counts: list[NatCount] = field(default_factory=list)   # the NAT tables counted (count_nat)

    def fill(self) -> dict[str, float]:
        """Entries / max_entries per table after the pass (the NAT tables when counted)."""
        out = {m.map: m.alive / m.max_entries for m in self.maps if m.max_entries}
        out.update((c.map, c.entries / c.max_entries) for c in self.nat_counts if c.max_entries)
        return out

    def nat_deleted_in(self, nat: str) -> int:
        """Entries of NAT table ``nat`` deleted with the CT entries owning them."""
        own = cttables.owners(nat)
        return sum(m.nat_deleted for m in self.maps if m.map in own)

    @property
    def deleted(self) -> int:
        return sum(m.deleted for m in self.maps)

    @property
    def alive(self) -> int:
        return sum(m.alive for m in self.maps)

    @property
    def nat_deleted(self) -> int:
        return sum(m.nat_deleted for m in self.maps)

    @property
    def capacity(self) -> int:
        return sum(m.max_entries for m in self.maps)

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"method": self.method, "duration_s": self.duration, "deleted": self.deleted,
                                "alive": self.alive, "nat_deleted": self.nat_deleted,
                                "maps": [m.__dict__ for m in self.maps]}
        if self.nat_counts:
            d["nat_tables"] = [c.__dict__ for c in self.nat_counts]
        d["fill"] = self.fill()
        return d


# --- the collector ----------------------------------------------------------------------------

class CtGc:
    """Garbage collector bound to CT maps and (optionally) their NAT maps: ``nat`` one NAT
    table or several (:data:`tuplet.datapath.cttables.NAT_TABLES`; a CT table whose NAT
    table is not given deletes its owned entries from a stand-in).

    Keep one for many passes: the programs are loaded once.
    """

    def __init__(self, ct_maps: list[Map], nat: Map | Sequence[Map] | None = None,
                 method: Method | str = Method.AUTO,
                 chunk: int = DEFAULT_CHUNK, obj_dir: str | Path | None = None, count_nat: bool = False,
                 slice_entries: int = DEFAULT_SLICE, switches: GcSwitches = GcSwitches(),
                 notify_maps: list[Map] | None = None) -> None:
        self.ct_maps = ct_maps
        self.nats = nat_list(nat)
        self.chunk = chunk
        self.count_nat = count_nat and bool(self.nats)
        self._layouts = {m.name: EntryLayout.of(m) for m in ct_maps}
        self._seen: int | None = None   # sentinels the last batch walk saw (None: not a batch walk)
        unknown = [m.name for m in ct_maps if m.name not in GC_SELECTOR]
        if unknown:
            raise TupletError(f"map {unknown[0]}", "gc", detail=f"GC knows only {', '.join(GC_SELECTOR)}")
        unknown = [m.name for m in self.nats if not cttables.is_nat(m.name)]
        if unknown:
            raise TupletError(f"map {unknown[0]}", "gc",
                              detail=f"not a NAT table ({', '.join(cttables.NAT_NAMES)})")
        where = Path(obj_dir) if obj_dir else object_dir()
        self._iter: IterPass | None = None
        self._deleter = KeyDeleter(load_on(where / OBJ_GC, ct_maps, self.nats, switches, notify_maps))
        want = Method(method)
        self.method = Method.BATCH
        if want is Method.BATCH:
            return
        try:
            self._iter = IterPass(load_on(where / OBJ_GC_ITER, ct_maps, self.nats, switches, notify_maps),
                                  ct_maps, slice_entries)
            self.method = Method.KERNEL
        except TupletError as e:
            if want is Method.KERNEL:
                self._deleter.close()
                raise
            log.warning("gc: iterator programs refused, using batch lookups and the in-kernel deleter",
                        error=str(e))

    def run(self, now: int | None = None) -> GcResult:
        """One pass over every map."""
        t0 = time.perf_counter()
        now = monotonic_now() if now is None else now % U32   # a u32 clock value, wrapped
        res = GcResult(self.method.value)
        for m in self.ct_maps:
            t = time.perf_counter()
            self._seen = None
            counts = self._iter.run(m, now) if self._iter is not None else self._batch_map(m, now)
            s = _stats(m, counts)
            if sentinels.applies(m):
                # The batch walk left them out (and counted them); the iterator counted them alive.
                had = sentinels.top_up(m, s.alive if self._seen is not None else s.alive - self._expected(m),
                                       self._seen, now)
                if self._seen is None:
                    s.alive -= had
            s.duration = time.perf_counter() - t
            res.maps.append(s)
        if self.count_nat:
            res.nat_counts = self.nat_counts()
        res.duration = time.perf_counter() - t0
        for s in res.maps:
            log.info("gc map", map=s.map, alive=s.alive, deleted=s.deleted, nat_deleted=s.nat_deleted,
                     kept_refreshed=s.kept_refreshed, duration_s=round(s.duration, 4))
        log.info("gc pass", method=res.method, deleted=res.deleted, alive=res.alive,
                 nat_deleted=res.nat_deleted, duration_s=round(res.duration, 4),
                 fill={k: round(v, 4) for k, v in res.fill().items()})
        return res

    def nat_counts(self) -> list[NatCount]:
        """Entries of each NAT table given, counted with bounded batch lookups."""
        if not self.nats:
            raise TupletError("gc", "count NAT entries", detail="no NAT map given")
        return [NatCount(m.name, sum(c for _, _, c in m.batches(self.chunk)), m.max_entries) for m in self.nats]

    def stall_gate(self) -> StallGate:
        """The handshake of the test-only stall (GcSwitches.stall_ns) of the method in use."""
        return StallGate(self._iter.coll if self._iter is not None else self._deleter.coll)

    def walk_only(self, m: Map) -> int:
        """Visit every entry of ``m`` (a CT or NAT table) in one program run, nothing else (a
        benchmark floor)."""
        return self._deleter.walk_once({**GC_SELECTOR, **GC_NAT_SELECTOR}[m.name])

    def iter_walk_only(self, m: Map) -> int:
        """Visit every entry of ``m`` with the sliced iterator, nothing else (a benchmark floor)."""
        if self._iter is None:
            raise TupletError(f"program {GC_ITER_PROGRAM[m.name]}", "gc", detail="iterators not loaded")
        return int(self._iter.run(m, 0, walk_only=True)[GC_V_COUNTED])

    def _batch_map(self, m: Map, now: int) -> np.ndarray:
        """Batch lookups in chunks; each chunk's expired entries go to the in-kernel deleter."""
        lay = self._layouts[m.name]
        counts = np.zeros(8, np.int64)
        buf = m.batch_buffers(self.chunk)
        seen = 0
        for count in m.lookup_chunks(buf):
            values = np.frombuffer(memoryview(buf.values), dtype=lay.value, count=count)
            sent = sentinels.raw_mask(memoryview(buf.keys), m.key_size, count)
            stale = expired(values["lifetime"], now) & ~sent
            n, k = int(stale.sum()), int(sent.sum())
            seen += k
            counts[GC_V_ALIVE] += count - n - k
            if n:
                recs = np.zeros(n, rec_dtype(m.key_size))
                recs["key"] = np.frombuffer(memoryview(buf.keys), dtype=f"V{m.key_size}", count=count)[stale]
                recs["seen"] = values["lifetime"][stale]
                counts += self._deleter.delete(m, recs, now)
        self._seen = seen
        return counts

    @staticmethod
    def _expected(m: Map) -> int:
        return sentinels.expected(m.max_entries)

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter = None
        self._deleter.close()

    def __enter__(self) -> "CtGc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stats(m: Map, counts: np.ndarray) -> MapGcStats:
    deleted = int(counts[GC_V_DELETED] + counts[GC_V_DELETED_NAT])
    refreshed = int(counts[GC_V_REFRESHED])
    return MapGcStats(m.name, alive=int(counts[GC_V_ALIVE]) + refreshed, deleted=deleted,
                      nat_deleted=int(counts[GC_V_DELETED_NAT]), kept_refreshed=refreshed,
                      gone=int(counts[GC_V_GONE]), max_entries=m.max_entries)


def gc_pass(maps: list[Map], now: int | None = None, chunk: int = DEFAULT_CHUNK,
            nat: Map | Sequence[Map] | None = None, method: Method | str = Method.AUTO) -> GcResult:
    """One pass over ``maps`` with a collector made for it."""
    with CtGc(maps, nat=nat, method=method, chunk=chunk) as g:
        return g.run(now)
