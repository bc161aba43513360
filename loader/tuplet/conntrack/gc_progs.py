"""The GC pass's BPF programs, loaded on the datapath's own maps.

``IterPass`` (bpf/ct_gc_iter.c): one ``iter/bpf_map_elem`` program per CT map, read in
slices of ``slice_entries`` bytes (one verdict byte per visited entry), so one ``read()``
visits at most that many entries before the CPU is given back.

``KeyDeleter`` (bpf/ct_gc.c's ``tpl_ct_gc_keys``): run with BPF_PROG_TEST_RUN on up to
``GC_KEYS_MAX`` (key, lifetime seen) records; deletes each entry whose lifetime is still
the one seen (re-read as the last step before the delete), then the NAT entry it owned.

Both take the test-only switches (``const volatile``, zero in production): a stall
between judging an entry expired and the final re-check, and a pass without the re-check.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuplet.bpf.iter import MapIterLink
from tuplet.bpf.maps import Map
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.core.errors import TupletError
from tuplet.datapath.abi import (
    GC_ITER_PROGRAM,
    GC_KEYS_MAX,
    GC_KEYS_PROGRAM,
    GC_PROGRAM,
    GC_SELECTOR,
    GC_TEST_ARMED,
    GC_TEST_JUDGED,
    GC_TEST_OUTCOME,
    GC_TEST_RELEASED,
    GC_TEST_STALL_NS,
    GC_TEST_UNPROTECTED,
    GC_VAR_NOW,
    GC_VAR_WALK_ONLY,
    GC_WALK_ONLY,
)

# struct gc_keys_args and struct gc_key_rec / gc_key6_rec in bpf/ct_gc.c, after a 14-byte
# Ethernet header.
_ETH = 14
_KEYS_ARGS = struct.Struct("<IIII6I")


def rec_dtype(key_size: int) -> np.dtype:
    """One record of tpl_ct_gc_keys for a table of ``key_size``-byte keys (gc_key_rec: 14,
    gc_key6_rec: 38): the key, padding, the lifetime judged expired."""
    return np.dtype([("key", f"V{key_size}"), ("pad", "<u2"), ("seen", "<u4")])


#: The largest buffer one tpl_ct_gc_keys run takes: GC_KEYS_MAX IPv4 records (2,614 bytes).
#: BPF_PROG_TEST_RUN refuses a tc program's buffer past a page less the skb's head and tail
#: room (EINVAL), which 128 IPv6 records (5,686 bytes) would pass: those go 58 a run.
_MAX_RUN_BYTES = _ETH + _KEYS_ARGS.size + GC_KEYS_MAX * rec_dtype(14).itemsize


def records_per_run(rec_size: int) -> int:
    """Records of ``rec_size`` bytes one run of tpl_ct_gc_keys takes."""
    return min(GC_KEYS_MAX, (_MAX_RUN_BYTES - _ETH - _KEYS_ARGS.size) // rec_size)
# struct gc_args (the one-run walk), after the Ethernet header.
_WALK_ARGS = struct.Struct("<II4Q")


@dataclass(frozen=True)
class GcSwitches:
    """Test-only load-time switches of the GC programs (both zero in production)."""

    stall_ns: int = 0          # most a stall spins between verdict and re-check (C caps it at 8 ms)
    unprotected: bool = False  # delete without the final re-check


class StallGate:
    """The test stall's handshake with a racing test (bpf/lib/ct_gc.h, ``.bss``).

    ``arm()`` before a pass; the first entry the pass judges expired sets ``judged()`` and
    spins (at most ``GcSwitches.stall_ns``, capped at 8 ms) until ``release()``;
    ``outcome()`` then says whether the release came in time (GC_STALL_RELEASED) or the
    stall timed out (GC_STALL_TIMED_OUT)."""

    def __init__(self, coll: Collection) -> None:
        self.coll = coll

    def arm(self) -> None:
        for name in (GC_TEST_JUDGED, GC_TEST_RELEASED, GC_TEST_OUTCOME):
            self.coll.set_global(".bss", name, 0)
        self.coll.set_global(".bss", GC_TEST_ARMED, 1)

    def judged(self) -> bool:
        return self.coll.get_global(".bss", GC_TEST_JUDGED) != 0

    def release(self) -> None:
        self.coll.set_global(".bss", GC_TEST_RELEASED, 1)

    def outcome(self) -> int:
        return self.coll.get_global(".bss", GC_TEST_OUTCOME)


def load_on(obj: Path, ct_maps: list[Map], nat_maps: list[Map], switches: GcSwitches,
            notify_maps: list[Map] | None = None) -> Collection:
    """Load a GC object reusing the datapath's maps (CT and NAT; the others shrunk to
    stand-ins; with ``notify_maps``, the pinned event ring and its flag, so deletions
    reach listeners)."""
    spec = ObjectSpec.open(obj)
    try:
        given = {m.name: m for m in [*ct_maps, *nat_maps, *(notify_maps or [])]}
        for name in spec.maps:
            if name in given:
                spec.reuse_map(name, given[name])
            elif "." not in name:          # not a data section (ct_gc.bss, ...)
                spec.set_max_entries(name, 64)
        spec.set_const(GC_TEST_STALL_NS, switches.stall_ns)
        spec.set_const(GC_TEST_UNPROTECTED, int(switches.unprotected))
        return spec.load()
    finally:
        spec.close()


class IterPass:
    """The sliced in-kernel pass: iterator programs, one link per CT map."""

    def __init__(self, coll: Collection, ct_maps: list[Map], slice_entries: int) -> None:
        self.coll = coll
        self.slice_entries = slice_entries
        self.links: dict[str, MapIterLink] = {}
        try:
            for m in ct_maps:
                self.links[m.name] = MapIterLink(coll.programs[GC_ITER_PROGRAM[m.name]], m)
        except Exception:
            self.close()
            raise

    def run(self, m: Map, now: int, walk_only: bool = False) -> np.ndarray:
        """One iteration over ``m``: counts per verdict (index = enum gc_verdict)."""
        self.coll.set_global(".bss", GC_VAR_NOW, now)
        self.coll.set_global(".bss", GC_VAR_WALK_ONLY, int(walk_only))
        counts = np.zeros(8, np.int64)
        for chunk in self.links[m.name].slices(self.slice_entries):
            counts += np.bincount(np.frombuffer(chunk, np.uint8), minlength=8)[:8]
        return counts

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.coll.close()


class KeyDeleter:
    """``tpl_ct_gc_keys``: the re-checking delete of the batch method (and the one-run walk)."""

    def __init__(self, coll: Collection) -> None:
        self.coll = coll

    def delete(self, m: Map, recs: np.ndarray, now: int) -> np.ndarray:
        """Records (rec_dtype(m.key_size)) judged expired: counts per verdict."""
        counts = np.zeros(8, np.int64)
        prog = self.coll.programs[GC_KEYS_PROGRAM]
        per_run = records_per_run(recs.dtype.itemsize)
        for s in range(0, len(recs), per_run):
            part = recs[s:s + per_run]
            pkt = bytes(_ETH) + _KEYS_ARGS.pack(GC_SELECTOR[m.name], len(part), now, 0, *([0] * 6)) + part.tobytes()
            r = prog.test_run(pkt, out_size=len(pkt))
            if r.retval != 0:
                raise TupletError(f"program {GC_KEYS_PROGRAM}", "gc", detail=f"returned {r.retval} on {m.name}")
            counts[:6] += _KEYS_ARGS.unpack_from(r.data, _ETH)[4:]
        return counts

    def walk_once(self, selector: int) -> int:
        """The whole map in one run, visiting only (a benchmark floor; holds its CPU throughout)."""
        pkt = bytes(_ETH) + _WALK_ARGS.pack(0, selector | GC_WALK_ONLY, 0, 0, 0, 0)
        r = self.coll.programs[GC_PROGRAM].test_run(pkt, out_size=len(pkt))
        if r.retval != 0:
            raise TupletError(f"program {GC_PROGRAM}", "gc", detail=f"returned {r.retval}")
        return int(_WALK_ARGS.unpack_from(r.data, _ETH)[2])

    def close(self) -> None:
        self.coll.close()
