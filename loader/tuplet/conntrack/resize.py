"""Live resize of the conntrack and NAT tables, as part of ``apply``.

A pinned CT or NAT map whose size differs from the configuration (and nothing else:
type, key and value size and flags must match, or ``apply`` refuses the pin as
before) is replaced while the datapath runs:

1. ``prepare``: before anything changes, a new map is created like the pinned one
   (same type, sizes, flags and BTF, so ``bpftool map dump`` still shows structs)
   with the new size, and the objects being loaded are told to use it.
2. ``copy``: after both objects loaded (just before the swap, to keep the window
   short), the live entries are copied with batch lookups and batch updates. When
   the new map is smaller than the live entry count, the most recently used entries
   are kept: CT entries by ``lifetime`` (refreshed on every packet), NAT entries
   owned by a kept CT entry first, then by ``created``. They are inserted least
   recent first, so should the LRU map evict while it fills, it evicts those.
3. The caller attaches the new programs; the program swap is atomic per hook
   (``bpf_link_update`` for TCX, ``BPF_TC_F_REPLACE`` for legacy TC).
4. ``finish``: after a short wait for in-flight runs of the old programs, entries
   they created after the first copy are copied too, never overwriting an entry
   the new programs wrote (BPF_NOEXIST, after a lookup: on an LRU map even a failed
   NOEXIST insert may evict). Then the new map is pinned beside the old pin and
   renamed over it (atomic on bpffs); the old map goes with its last reference.

A failure before the swap discards the new maps: pins and programs are untouched.
A failure after the swap started (an attach, the services sync) puts the programs
that ran before back on their hooks (``rollback``), copies the entries the new
programs created meanwhile into the old maps, and discards the new maps.

Known window: entries the old programs *updated* (not created) between the first
copy and the swap keep their first-copy values in the new map (a few packets'
counters, a state change seen in those milliseconds) until the next packet.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import structlog

from tuplet.bpf.links import Attachment, attach, attached_prog_id
from tuplet.bpf.maps import Map, MapInfo, possible_cpus
from tuplet.bpf.objects import MapSpec, ObjectSpec
from tuplet.bpf.programs import Program
from tuplet.conntrack import sentinels
from tuplet.conntrack.entries import EntryLayout, nat_keys_for
from tuplet.conntrack.keyset import KeySet
from tuplet.core import crashpoints
from tuplet.core.errors import TupletError
from tuplet.datapath import clock, cttables
from tuplet.datapath.layouts import CtEntry

log = structlog.get_logger("tuplet.resize")

#: The maps ``apply`` resizes live, in the order they are copied (CT before NAT:
#: which NAT entries to keep depends on which CT entries were kept).
RESIZABLE = (*cttables.NAMES, *cttables.NAT_NAMES)
#: Wait after the swap before the second copy, for runs of the old programs in flight.
SYNC_DELAY = 0.05
#: The new map is pinned as <pin_root>/resize-<name> and renamed over the old pin.
TMP_PREFIX = "resize-"
CHUNK = 8192
#: The largest rank value NAT entries get from ``created``; owned entries go above it.
_OWNED = 1 << 62


@dataclass
class Resized:
    """What one live resize did."""

    map: str
    old_entries: int      # max_entries before
    new_entries: int      # max_entries after
    copied: int = 0       # entries in the new map that came from the old one
    dropped: int = 0      # live entries not kept (the new map is smaller than they are many)
    duration_s: float = 0.0


@dataclass
class _Table:
    name: str
    pin: str
    old: Map
    new: Map
    result: Resized
    seen: list[bytes] = field(default_factory=list)   # keys whose fate the first copy decided
    elapsed: float = 0.0
    first_copy: float = 0.0   # the first copy; old programs' updates in this window are not carried


def only_size_differs(spec: MapSpec, info: MapInfo) -> bool:
    """True when a pinned map matches the spec in everything but max_entries."""
    return (spec.type, spec.key_size, spec.value_size, spec.flags) == \
        (info.type, info.key_size, info.value_size, info.flags) and spec.max_entries != info.max_entries


def _field(values: bytes, stride: int, offset: int, dtype: str) -> np.ndarray:
    """One field of every packed value (a strided view, no copy)."""
    n = len(values) // stride
    return np.ndarray((n,), dtype=dtype, buffer=values, offset=offset, strides=(stride,))


def remove_stray_pins(pin_root: str) -> list[str]:
    """Remove the temporary pins (``resize-*``) of a resize that was killed before its rename.

    Such a pin names a map the datapath may run on: a program holds it, and the next
    ``apply`` attaches programs on the pinned maps again (live entries copied as usual)."""
    gone = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(pin_root)):
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(pin_root, name))
                gone.append(name)
    if gone:
        log.warning("resize: temporary pins of an interrupted resize removed", pins=gone)
    return gone


class Resizer:
    """The live resizes of one ``apply``. Inactive (every method a no-op) when no size changed."""

    def __init__(self, pin_root: str) -> None:
        self.pin_root = pin_root
        self.tables: dict[str, _Table] = {}
        self._saved: dict[tuple[str, str, str], Program] = {}

    @property
    def active(self) -> bool:
        return bool(self.tables)

    @property
    def pins(self) -> set[str]:
        """Pin paths of the resized maps (the old pins stay in place until ``finish``)."""
        return {t.pin for t in self.tables.values()}

    # --- before the swap -------------------------------------------------------------------------

    def prepare(self, specs: list[ObjectSpec]) -> None:
        """Find pins that differ from the specs only in size; make new maps the specs will use.

        Changes nothing the running datapath sees. Any other difference is left to
        ``ObjectSpec.load``, which refuses the pin.
        """
        try:
            for spec in specs:
                for name, ms in spec.maps.items():
                    if name not in RESIZABLE or name in self.tables or not ms.pin_path \
                            or not os.path.exists(ms.pin_path):
                        continue
                    old = Map.from_pin(ms.pin_path)
                    if not only_size_differs(ms, old.info):
                        old.close()
                        continue
                    try:
                        new = old.create_like(ms.max_entries)
                    except BaseException:
                        old.close()
                        raise
                    self.tables[name] = _Table(name, ms.pin_path, old, new,
                                               Resized(name, old.max_entries, ms.max_entries))
            for spec in specs:
                present = spec.maps
                for name, t in self.tables.items():
                    if name in present:
                        spec.reuse_map(name, t.new)
        except BaseException:
            self.close()
            raise
        if self.tables:
            log.info("resizing", maps={n: f"{t.result.old_entries} -> {t.result.new_entries}"
                                       for n, t in self.tables.items()})

    def copy(self) -> None:
        """First copy of the live entries into the new maps (call just before the swap)."""
        for name in RESIZABLE:
            t = self.tables.get(name)
            if t is not None:
                t0 = time.perf_counter()
                self._first_copy(t)
                t.first_copy = time.perf_counter() - t0
                t.elapsed += t.first_copy

    def save_programs(self, attachments: list[Attachment]) -> None:
        """Hold the programs running on these hooks now, so ``rollback`` can put them back."""
        if not self.active:
            return
        for a in attachments:
            try:
                pid = attached_prog_id(a)
                if pid:
                    self._saved[(a.ifname, a.hook.value, a.mode.value)] = Program.from_id(pid, a.program)
            except (TupletError, OSError):
                continue

    def _first_copy(self, t: _Table) -> None:
        old, new = t.old, t.new
        ks, vs, cap = old.key_size, old.value_buf_size, new.max_entries
        n = inserted = 0
        if cap >= old.max_entries:
            # Everything the old map can hold fits: stream, one chunk of values in memory.
            for keys, vals, c in self._batches(old):
                new.update_batch(keys, vals, c)
                t.seen.append(keys)
                n += c
            inserted = n
        else:
            kparts, vparts = [], []
            for keys, vals, c in self._batches(old):
                kparts.append(keys)
                vparts.append(vals)
                n += c
            keys, vals = b"".join(kparts), b"".join(vparts)
            del kparts, vparts
            t.seen.append(keys)
            if n > cap:
                rank = self._rank(t, keys, vals)
                order = np.argsort(rank, kind="stable")[n - cap:]   # the cap most recent, least recent first
                keys = np.frombuffer(keys, dtype=f"V{ks}")[order].tobytes()
                vals = np.frombuffer(vals, dtype=f"V{vs}")[order].tobytes()
            inserted = len(keys) // ks
            for i in range(0, inserted, CHUNK):
                c = min(CHUNK, inserted - i)
                new.update_batch(keys[i * ks:(i + c) * ks], vals[i * vs:(i + c) * vs], c)
        # An LRU map may evict before it is full (per-CPU free lists): count when it could have.
        slack = 256 * possible_cpus()
        copied = sentinels.count_live(new) if inserted + slack > cap else inserted
        t.result.copied, t.result.dropped = copied, n - copied
        if sentinels.applies(new) and sentinels.room(new, copied):
            sentinels.seed(new)   # the new table's own (never copied: the old ones were left out)

    @staticmethod
    def _batches(m: Map) -> Iterator[tuple[bytes, bytes, int]]:
        """``m.batches`` without the sentinels of a CT map."""
        ks, vs = m.key_size, m.value_buf_size
        ct = cttables.is_ct(m.name)
        for keys, vals, c in m.batches(sentinels.READ_CHUNK if ct else CHUNK):
            if not ct:
                yield keys, vals, c
                continue
            keep = ~sentinels.raw_mask(keys, ks, c)
            k = int(keep.sum())
            if k == c:
                yield keys, vals, c
            elif k:
                yield (np.frombuffer(keys, dtype=f"V{ks}", count=c)[keep].tobytes(),
                       np.frombuffer(vals, dtype=f"V{vs}", count=c)[keep].tobytes(), k)

    def _rank(self, t: _Table, keys: bytes, vals: bytes) -> np.ndarray:
        """How recently each entry was used (higher: more recent)."""
        vs = t.old.value_buf_size
        if cttables.is_ct(t.name):
            if vs != ctypes.sizeof(CtEntry):
                raise TupletError(f"map {t.name}", "resize", detail=f"value is {vs} bytes, not a ct_entry")
            # Seconds left, as a signed difference: lifetimes are u32 and may wrap.
            left = _field(vals, vs, CtEntry.lifetime.offset, "<u4") - np.uint32(clock.monotonic_now())
            return left.astype(np.int32).astype(np.int64)
        nat = cttables.nat_table(t.name)
        if vs != nat.value_size:
            raise TupletError(f"map {t.name}", "resize", detail=f"value is {vs} bytes, not a {nat.value.__name__}")
        rank = np.minimum(_field(vals, vs, nat.value.created.offset, "<u8"), _OWNED - 1)
        owned = self._owned_nat_keys(t.name, t.old.key_size)
        if owned is not None:
            rank = rank + np.where(owned.contains(keys), np.uint64(_OWNED), np.uint64(0))
        out: np.ndarray = rank
        return out

    def _owned_nat_keys(self, nat: str, key_size: int) -> KeySet | None:
        """Keys of NAT table ``nat`` owned by the CT entries the datapath will have (None: not known)."""
        out = []
        try:
            for name in cttables.owners(nat):
                t = self.tables.get(name)
                with contextlib.ExitStack() as stack:
                    if t is not None:
                        m = t.new
                    else:
                        pin = os.path.join(self.pin_root, name)
                        if not os.path.exists(pin):
                            continue
                        m = stack.enter_context(Map.from_pin(pin))
                    lay = EntryLayout.of(m)
                    for keys, vals, c in m.batches(CHUNK):
                        k = np.frombuffer(keys, dtype=lay.key, count=c)
                        v = np.frombuffer(vals, dtype=lay.value, count=c)
                        out.append(nat_keys_for(k, v, lay).tobytes())
        except TupletError as e:
            log.warning("resize: NAT entries ranked by age only", error=str(e))
            return None
        return KeySet(key_size, out)

    # --- after the swap --------------------------------------------------------------------------

    def finish(self) -> list[Resized]:
        """Second copy (entries the old programs made meanwhile), then the new maps take the pins."""
        if not self.active:
            return []
        time.sleep(SYNC_DELAY)   # runs of the old programs in flight finish
        failed = []
        try:
            for name in RESIZABLE:
                t = self.tables.get(name)
                if t is None:
                    continue
                t0 = time.perf_counter()
                try:
                    t.result.copied += self._late_copy(t)
                except TupletError as e:   # the new map is live already: the pin must follow
                    log.error("resize: second copy failed", map=name, error=str(e))
                try:
                    self._replace_pin(t)
                except (TupletError, OSError) as e:
                    failed.append(f"{t.pin}: {e}")
                t.elapsed += time.perf_counter() - t0
                r = t.result
                r.duration_s = round(t.elapsed, 4)
                log.info("map resized", map=name, old_entries=r.old_entries, new_entries=r.new_entries,
                         copied=r.copied, dropped=r.dropped, duration_s=r.duration_s,
                         first_copy_s=round(t.first_copy, 4))
            results = [t.result for n in RESIZABLE if (t := self.tables.get(n)) is not None]
        finally:
            self.close()
        if failed:
            raise TupletError("resized maps", "pin", detail="the datapath runs on the new maps, but "
                              "these pins still name the old ones: " + "; ".join(failed))
        return results

    def _late_copy(self, t: _Table) -> int:
        """Copy entries absent from the first copy (made by the old programs since) into the new map."""
        ks, vs = t.old.key_size, t.old.value_buf_size
        seen = KeySet(ks, t.seen)
        t.seen = []
        copied = 0
        for keys, vals, c in self._batches(t.old):
            fresh = np.nonzero(~seen.contains(keys))[0]
            for i in fresh:
                key = keys[i * ks:(i + 1) * ks]
                if t.new.lookup(key) is not None:
                    continue   # the new programs have it already: theirs is newer
                if t.new.insert(key, vals[i * vs:(i + 1) * vs]):
                    copied += 1
        return copied

    def _replace_pin(self, t: _Table) -> None:
        tmp = os.path.join(self.pin_root, TMP_PREFIX + t.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)   # left by an interrupted run
        t.new.pin(tmp)
        crashpoints.point("resize.tmp-pinned")
        try:
            os.rename(tmp, t.pin)   # atomic: readers of the pin see the old map or the new one
        except OSError as e:
            log.warning("resize: rename over the pin failed, replacing it", pin=t.pin, error=str(e))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t.pin)
            try:
                t.new.pin(t.pin)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    # --- failure ---------------------------------------------------------------------------------

    def rollback(self, attachments: list[Attachment], made: list[Attachment]) -> list[Attachment]:
        """After a failure once the swap may have started: the old programs back on their hooks.

        ``attachments`` are the hooks this run attached, ``made`` those of them that had
        nothing of tuplet's before (the caller removes them). Returns the attachments the
        caller must also remove: a hook that had its program in the other mode (that
        attachment is still there). Entries the new programs created meanwhile are
        copied into the old maps.
        """
        if not self.active or not attachments:
            return []
        undo = []
        for a in attachments:
            if any(a is m for m in made):
                continue
            prog = self._saved.get((a.ifname, a.hook.value, a.mode.value))
            if prog is None:
                undo.append(a)
                continue
            try:
                attach(prog, a.ifname, a.hook, self.pin_root, a.mode)
            except (TupletError, OSError) as e:
                log.error("resize: could not put the old program back", ifname=a.ifname, hook=a.hook.value,
                          error=str(e))
        for t in self.tables.values():
            try:
                ks, vs = t.new.key_size, t.new.value_buf_size
                back = sum(1 for keys, vals, c in self._batches(t.new) for i in range(c)   # not its sentinels
                           if t.old.lookup(key := keys[i * ks:(i + 1) * ks]) is None
                           and t.old.insert(key, vals[i * vs:(i + 1) * vs]))
            except TupletError as e:
                log.error("resize: copying back failed", map=t.name, error=str(e))
                continue
            log.info("resize rolled back", map=t.name, copied_back=back)
        return undo

    def close(self) -> None:
        """Release the maps and programs held (the new maps go unless a program or pin holds them)."""
        for t in self.tables.values():
            t.old.close()
            t.new.close()
        for p in self._saved.values():
            p.close()
        self._saved.clear()
