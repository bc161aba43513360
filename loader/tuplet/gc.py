"""Conntrack garbage collection: one pass over both CT maps with batch operations.

A pass reads each map with BPF_MAP_LOOKUP_BATCH in chunks, decides expiry over the
raw chunk with numpy (the value dtype comes from the map's own BTF), looks each
candidate up again just before deleting so that an entry the datapath refreshed
meanwhile survives, and deletes the rest with BPF_MAP_DELETE_BATCH. Memory is one
chunk per map, whatever the map's size.

(The re-check narrows the reference's race, where a whole pass separated read and
delete, to the time between one chunk's re-check and its batch delete.)
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from . import _libbpf as C
from .ct import monotonic_now
from .errors import TupletError
from .maps import Map

log = structlog.get_logger("tuplet.gc")

DEFAULT_CHUNK = 32768


@dataclass
class MapGcStats:
    map: str
    alive: int = 0
    deleted: int = 0
    kept_refreshed: int = 0   # expired when read, refreshed by the datapath before the delete
    max_entries: int = 0


@dataclass
class GcResult:
    maps: list[MapGcStats] = field(default_factory=list)
    duration: float = 0.0

    @property
    def deleted(self) -> int:
        return sum(m.deleted for m in self.maps)

    @property
    def alive(self) -> int:
        return sum(m.alive for m in self.maps)


def value_dtype(m: Map) -> np.dtype:
    """numpy dtype of the map's values, from the BTF the map was created with."""
    dt = m.btf().numpy_dtype(m.info.btf_value_type_id)
    if dt.itemsize != m.value_size or "lifetime" not in (dt.names or ()):
        raise TupletError(m.what, "gc", detail=f"value layout from BTF ({dt.itemsize} bytes) "
                          f"does not match the map ({m.value_size} bytes) or lacks a lifetime")
    return dt


def gc_map(m: Map, now: int | None = None, chunk: int = DEFAULT_CHUNK) -> MapGcStats:
    """Delete the entries of one CT map whose lifetime is below ``now``."""
    now = monotonic_now() if now is None else now
    vdt = value_dtype(m)
    kdt = np.dtype(f"V{m.key_size}")
    stats = MapGcStats(m.name, max_entries=m.max_entries)
    buf = m.batch_buffers(chunk)
    token: bytes | None = None
    while True:
        count, nxt = m.lookup_batch(buf, token)
        if count:
            lifetimes = np.frombuffer(buf.values, dtype=vdt, count=count)["lifetime"]
            expired = lifetimes < now
            n_exp = int(np.count_nonzero(expired))
            deleted = 0
            if n_exp:
                candidates = np.frombuffer(buf.keys, dtype=kdt, count=count)[expired].copy()
                deleted = _recheck_and_delete(m, buf, token, candidates, now, vdt, kdt, stats)
            stats.deleted += deleted
            stats.alive += count - deleted
        if nxt is None:
            return stats
        token = nxt


def _recheck_and_delete(m: Map, buf, token: bytes | None, candidates: np.ndarray, now: int,
                        vdt: np.dtype, kdt: np.dtype, stats: MapGcStats) -> int:
    """Look each candidate up again; delete, in one batch, those still expired."""
    ks = m.key_size
    raw = candidates.tobytes()
    val = ctypes.create_string_buffer(m.value_size)
    off = vdt.fields["lifetime"][1]
    lookup = C.bpf_map_lookup_elem
    fd = m.fd
    final = bytearray()
    kept = 0
    for i in range(0, len(raw), ks):
        k = raw[i:i + ks]
        if lookup(fd, k, val) == 0 and int.from_bytes(val.raw[off:off + 4], "little") < now:
            final += k
        else:
            kept += 1
    stats.kept_refreshed += kept
    n = len(final) // ks
    return m.delete_batch(bytes(final), n) if n else 0


def gc_pass(maps: list[Map], now: int | None = None, chunk: int = DEFAULT_CHUNK) -> GcResult:
    """One pass over every CT map."""
    t0 = time.perf_counter()
    now = monotonic_now() if now is None else now
    res = GcResult([gc_map(m, now, chunk) for m in maps])
    res.duration = time.perf_counter() - t0
    for s in res.maps:
        log.info("gc map", map=s.map, alive=s.alive, deleted=s.deleted, kept_refreshed=s.kept_refreshed)
    log.info("gc pass", deleted=res.deleted, alive=res.alive, duration_s=round(res.duration, 4))
    return res
