"""Conntrack garbage collection: one pass over the CT maps and the NAT entries they own.

Two ways to run a pass, with the same result:

``kernel`` (the default when the kernel accepts it)
    The ``tpl_ct_gc`` program (bpf/ct_gc.c) is run with BPF_PROG_TEST_RUN once per
    map. It walks the map with ``bpf_for_each_map_elem``, and for each entry whose
    lifetime is below ``now`` deletes the NAT entry it owns and then the entry,
    reading the lifetime in the same callback that deletes. Nothing is copied to
    user space; memory use does not depend on the map size.

``batch``
    Read each map with BPF_MAP_LOOKUP_BATCH in chunks (growing the buffer on
    ENOSPC), decide expiry over the raw chunk with numpy (dtypes from the map's own
    BTF), look every candidate up again just before deleting so an entry the
    datapath refreshed meanwhile survives, then BPF_MAP_DELETE_BATCH the CT keys
    and the NAT keys they own. Memory is one chunk per map.

Both keep the reference's known race (an entry refreshed between the decision and
the delete) to a window of instructions (kernel) or one chunk's re-check (batch),
instead of a whole pass.

With ``count_nat`` a pass also counts the NAT table's entries (GC deletes NAT entries
only with their owners, so it does not walk it otherwise): in the kernel when
``tpl_ct_gc`` has a walk-only selector for it, else with batch lookups. The pass's
result then has every table's fill (entries / max_entries) for :mod:`tuplet.conntrack.pressure`.
"""
from __future__ import annotations

import ctypes
import enum
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from tuplet.bpf.maps import Map
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.conntrack.entries import EntryLayout, nat_keys_for
from tuplet.core.errors import TupletError
from tuplet.datapath.abi import (
    GC_MAP_NAT,
    GC_PROGRAM,
    GC_SELECTOR,
    GC_WALK_ONLY,
    NAT_MAP,
    OBJ_GC,
)
from tuplet.datapath.clock import monotonic_now
from tuplet.datapath.paths import object_dir

log = structlog.get_logger("tuplet.gc")

DEFAULT_CHUNK = 32768

# struct gc_args in bpf/ct_gc.c, after a 14-byte Ethernet header the program skips.
_ARGS_OFF = 14
_ARGS = struct.Struct("<II4Q")


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
    kept_refreshed: int = 0   # expired when read, refreshed by the datapath before the delete
    max_entries: int = 0
    duration: float = 0.0


@dataclass
class GcResult:
    method: str = ""
    maps: list[MapGcStats] = field(default_factory=list)
    duration: float = 0.0
    nat_entries: int | None = None    # entries of the NAT table after the pass (count_nat)
    nat_max_entries: int = 0

    def fill(self) -> dict[str, float]:
        """Entries / max_entries per table after the pass (the NAT table when counted)."""
        out = {m.map: m.alive / m.max_entries for m in self.maps if m.max_entries}
        if self.nat_entries is not None and self.nat_max_entries:
            out[NAT_MAP] = self.nat_entries / self.nat_max_entries
        return out

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
        if self.nat_entries is not None:
            d["nat_entries"], d["nat_max_entries"] = self.nat_entries, self.nat_max_entries
        d["fill"] = self.fill()
        return d


# --- layouts from BTF -------------------------------------------------------------------------


# --- the collector ----------------------------------------------------------------------------

class CtGc:
    """Garbage collector bound to CT maps and (optionally) their NAT map.

    Keep one for many passes: the kernel method loads its program once.
    """

    def __init__(self, ct_maps: list[Map], nat: Map | None = None, method: Method | str = Method.AUTO,
                 chunk: int = DEFAULT_CHUNK, obj_dir: str | Path | None = None, count_nat: bool = False) -> None:
        self.ct_maps = ct_maps
        self.nat = nat
        self.chunk = chunk
        self.count_nat = count_nat and nat is not None
        self._nat_in_kernel: bool | None = None   # None: not tried yet
        self._layouts = {m.name: EntryLayout.of(m) for m in ct_maps}
        self._coll: Collection | None = None
        want = Method(method)
        if want is Method.BATCH:
            self.method = Method.BATCH
            return
        try:
            self._coll = self._load_kernel(Path(obj_dir) if obj_dir else object_dir())
            self.method = Method.KERNEL
        except TupletError as e:
            if want is Method.KERNEL:
                raise
            log.warning("gc: in-kernel pass unavailable, using batch operations", error=str(e))
            self.method = Method.BATCH

    def _load_kernel(self, obj_dir: Path) -> Collection:
        unknown = [m.name for m in self.ct_maps if m.name not in GC_SELECTOR]
        if unknown:
            raise TupletError(f"map {unknown[0]}", "gc", detail="the in-kernel pass knows only "
                              f"{', '.join(GC_SELECTOR)}")
        spec = ObjectSpec.open(obj_dir / OBJ_GC)
        try:
            given = {m.name: m for m in self.ct_maps}
            if self.nat is not None:
                given[NAT_MAP] = self.nat
            for name in spec.maps:
                if name in given:
                    spec.reuse_map(name, given[name])
                elif not name.startswith("."):
                    spec.set_max_entries(name, 64)   # not collected this time: keep the stand-in small
            return spec.load()
        finally:
            spec.close()

    def run(self, now: int | None = None) -> GcResult:
        """One pass over every map."""
        t0 = time.perf_counter()
        now = monotonic_now() if now is None else now
        res = GcResult(self.method.value)
        for m in self.ct_maps:
            t = time.perf_counter()
            s = self._kernel_map(m, now) if self.method is Method.KERNEL else self._batch_map(m, now)
            s.duration = time.perf_counter() - t
            res.maps.append(s)
        if self.count_nat and self.nat is not None:
            res.nat_entries, res.nat_max_entries = self.nat_count(), self.nat.max_entries
        res.duration = time.perf_counter() - t0
        for s in res.maps:
            log.info("gc map", map=s.map, alive=s.alive, deleted=s.deleted, nat_deleted=s.nat_deleted,
                     kept_refreshed=s.kept_refreshed, duration_s=round(s.duration, 4))
        log.info("gc pass", method=res.method, deleted=res.deleted, alive=res.alive,
                 nat_deleted=res.nat_deleted, duration_s=round(res.duration, 4),
                 fill={k: round(v, 4) for k, v in res.fill().items()})
        return res

    def nat_count(self) -> int:
        """Entries of the NAT table: a walk in the kernel where the GC program can, else batch lookups."""
        if self.nat is None:
            raise TupletError("NAT table", "count", detail="this collector has none")
        if self._coll is not None and self._nat_in_kernel is not False:
            try:
                n = self._run_program(GC_MAP_NAT | GC_WALK_ONLY, 0)[0]
                self._nat_in_kernel = True
                return n
            except TupletError as e:
                if self._nat_in_kernel:
                    raise
                self._nat_in_kernel = False
                log.debug("gc: NAT entries counted with batch lookups", reason=str(e))
        return sum(c for _, _, c in self.nat.batches(self.chunk))

    # --- kernel ---------------------------------------------------------------------------------

    def _run_program(self, selector: int, now: int) -> tuple[int, int, int]:
        """Run tpl_ct_gc once; returns (alive, deleted, nat_deleted) as it counted them."""
        if self._coll is None:
            raise TupletError(f"program {GC_PROGRAM}", "gc", detail="not loaded (the batch method has none)")
        pkt = bytes(_ARGS_OFF) + _ARGS.pack(now, selector, 0, 0, 0, 0)
        r = self._coll.programs[GC_PROGRAM].test_run(pkt, out_size=len(pkt))
        if r.retval != 0:
            raise TupletError(f"program {GC_PROGRAM}", "gc", detail=f"returned {r.retval} for map "
                              f"selector {selector:#x}")
        _, _, alive, deleted, nat_deleted, _gone = _ARGS.unpack_from(r.data, _ARGS_OFF)
        return alive, deleted, nat_deleted

    def _kernel_map(self, m: Map, now: int) -> MapGcStats:
        alive, deleted, nat_deleted = self._run_program(GC_SELECTOR[m.name], now)
        return MapGcStats(m.name, alive=alive, deleted=deleted, nat_deleted=nat_deleted,
                          max_entries=m.max_entries)

    def walk_only(self, m: Map) -> int:
        """Visit every entry of ``m`` in the kernel and do nothing else (a benchmark floor)."""
        return self._run_program(GC_SELECTOR[m.name] | GC_WALK_ONLY, 0)[0]

    # --- batch ----------------------------------------------------------------------------------

    def _batch_map(self, m: Map, now: int) -> MapGcStats:
        lay = self._layouts[m.name]
        stats = MapGcStats(m.name, max_entries=m.max_entries)
        buf = m.batch_buffers(self.chunk)
        token: bytes | None = None
        while True:
            count, nxt = m.lookup_batch(buf, token)
            if count:
                values = np.frombuffer(buf.values.raw, dtype=lay.value, count=count)
                expired = values["lifetime"] < now
                deleted = 0
                if expired.any():
                    keys = np.frombuffer(buf.keys.raw, dtype=lay.key, count=count)[expired].copy()
                    deleted = self._recheck_and_delete(m, lay, keys, values[expired].copy(), now, stats)
                stats.deleted += deleted
                stats.alive += count - deleted
            if nxt is None:
                return stats
            token = nxt

    def _recheck_and_delete(self, m: Map, lay: EntryLayout, keys: np.ndarray, values: np.ndarray,
                            now: int, stats: MapGcStats) -> int:
        """Look each candidate up again; delete, in batches, those still expired."""
        ks = m.key_size
        raw = keys.tobytes()
        val = ctypes.create_string_buffer(m.value_size)
        off = lay.lifetime_offset
        still = np.zeros(len(keys), bool)
        for i in range(len(keys)):
            if m.lookup_into(raw[i * ks:(i + 1) * ks], val) and \
                    int.from_bytes(val.raw[off:off + 4], "little") < now:
                still[i] = True
        stats.kept_refreshed += int(len(keys) - still.sum())
        doomed = keys[still]
        if self.nat is not None:
            nat = nat_keys_for(doomed, values[still], lay)
            if len(nat):
                stats.nat_deleted += self.nat.delete_batch(nat.tobytes(), len(nat))
        return m.delete_batch(doomed.tobytes(), len(doomed)) if len(doomed) else 0

    def close(self) -> None:
        if self._coll is not None:
            self._coll.close()
            self._coll = None

    def __enter__(self) -> "CtGc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gc_pass(maps: list[Map], now: int | None = None, chunk: int = DEFAULT_CHUNK, nat: Map | None = None,
            method: Method | str = Method.AUTO) -> GcResult:
    """One pass over ``maps`` with a collector made for it."""
    with CtGc(maps, nat=nat, method=method, chunk=chunk) as g:
        return g.run(now)
