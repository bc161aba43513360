"""Conntrack events (``tuplet ct events``, like ``conntrack -E``), bpf/lib/ct_notify.h.

One channel: the pinned ring buffer ``tpl_ct_notify_v1``. The datapath writes NEW records
(rate-limited per CPU), GC's deleter programs write DESTROY records as they delete, and
deletions made from user space (``ct flush``, an endpoint's removal, ``ct delete``) are
written by :class:`Emitter`, which runs ``tpl_ct_notify_emit`` (bpf/ct_gc.c) with
BPF_PROG_TEST_RUN on the records of what the flusher just deleted. Everything is written
only while a listener has set ``tpl_ct_notify_ctl_v1[0].listeners``; records the ring could
not take (full, or over the datapath's rate) are counted per CPU in ``tpl_ct_notify_lost_v1``.

A BPF ring buffer has one consumer position: one listener at a time (:class:`Listener`
refuses a second unless forced, which is for a listener that died without detaching).
"""
from __future__ import annotations

import ctypes
import errno
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from tuplet.bpf.maps import Map
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.bpf.ringbuf import RingBuffer
from tuplet.conntrack.ctfilter import CtFilter, FilterLayout
from tuplet.conntrack.records import CtRecord
from tuplet.core.errors import TupletError
from tuplet.datapath import abi, paths
from tuplet.datapath.layouts import CtEntry, CtNotifyCpu, CtNotifyCtl, CtNotifyRec, CtTuple4

NOTIFY_MAPS = (abi.NOTIFY_MAP, abi.NOTIFY_CTL_MAP, abi.NOTIFY_LOST_MAP)
TYPES = {abi.CT_NOTIFY_NEW: "NEW", abi.CT_NOTIFY_DESTROY: "DESTROY"}
REASONS = {abi.CT_NOTIFY_R_CREATED: "created", abi.CT_NOTIFY_R_PROMOTED: "promoted", abi.CT_NOTIFY_R_GC: "gc",
           abi.CT_NOTIFY_R_FLUSH: "flush", abi.CT_NOTIFY_R_ENDPOINT: "endpoint", abi.CT_NOTIFY_R_DELETE: "delete"}
TABLES = {abi.CT_NOTIFY_T_TCP: abi.CT_MAP_TCP, abi.CT_NOTIFY_T_ANY: abi.CT_MAP_ANY, abi.CT_NOTIFY_T_SYN: abi.CT_MAP_SYN}
TABLE_OF = {v: k for k, v in TABLES.items()}
#: The datapath's records per CPU per second while listening (``--rate``).
DEFAULT_RATE = 100_000
EMIT_MAX = 64                          # CT_NOTIFY_EMIT_MAX in bpf/ct_gc.c
_ETH = 14
_REC = ctypes.sizeof(CtNotifyRec)
_ENTRY_OFF = CtNotifyRec.entry.offset
_TUPLE_OFF = CtNotifyRec.tuple.offset


def rec_dtype(layout: FilterLayout) -> np.dtype[Any]:
    """struct ct_notify_rec as numpy, with the CT map's key and value dtypes inside."""
    return np.dtype({"names": ["ktime_ns", "entry", "tuple", "type", "reason", "table"],
                     "formats": ["<u8", layout.value, layout.key, "u1", "u1", "u1"],
                     "offsets": [0, _ENTRY_OFF, _TUPLE_OFF, CtNotifyRec.type.offset,
                                 CtNotifyRec.reason.offset, CtNotifyRec.table.offset],
                     "itemsize": _REC})


def open_maps(pin_root: str, stack: ExitStack) -> list[Map]:
    """The pinned notify maps (all three, or none when the datapath predates them)."""
    if not all(paths.is_pinned(pin_root, n) for n in NOTIFY_MAPS):
        return []
    return [stack.enter_context(paths.open_pinned(pin_root, n)) for n in NOTIFY_MAPS]


def _ctl(ctl: Map) -> CtNotifyCtl:
    return CtNotifyCtl.from_buffer_copy(ctl.lookup(struct.pack("<I", 0)) or bytes(ctypes.sizeof(CtNotifyCtl)))


def listening(ctl: Map) -> bool:
    return bool(_ctl(ctl).listeners > 0)


def lost(lost_map: Map) -> int:
    """Records not delivered since the maps were created, summed over CPUs."""
    raw = lost_map.lookup(struct.pack("<I", 0)) or b""
    stride, off = lost_map.value_stride, CtNotifyCpu.lost.offset
    return sum(int.from_bytes(raw[c * stride + off:c * stride + off + 8], "little") for c in range(lost_map.ncpus))


class Emitter:
    """DESTROY records of deletions made from user space, through ``tpl_ct_notify_emit``."""

    def __init__(self, notify_maps: list[Map], obj: Path) -> None:
        self.ctl = notify_maps[1]
        self.coll: Collection | None = None
        spec = ObjectSpec.open(obj)
        try:
            given = {m.name: m for m in notify_maps}
            for name in spec.maps:
                if name in given:
                    spec.reuse_map(name, given[name])
                elif "." not in name:
                    spec.set_max_entries(name, 64)     # stand-ins: the program uses none of them
            self.coll = spec.load()
        finally:
            spec.close()

    def emit(self, map_name: str, keys: np.ndarray, values: np.ndarray, reason: int) -> int:
        """Records for the deleted ``keys``/``values`` of ``map_name``; returns how many were
        written (0 when nobody listens)."""
        if self.coll is None or not len(keys) or map_name not in TABLE_OF or not listening(self.ctl):
            return 0   # (struct ct_notify_rec carries an IPv4 tuple: the IPv6 tables have no records yet)
        recs = np.zeros(len(keys), np.dtype((np.void, _REC)))
        raw = recs.view(np.uint8).reshape(len(keys), _REC)
        raw[:, _ENTRY_OFF:_ENTRY_OFF + values.dtype.itemsize] = values.view(np.uint8).reshape(len(keys), -1)
        raw[:, _TUPLE_OFF:_TUPLE_OFF + keys.dtype.itemsize] = keys.view(np.uint8).reshape(len(keys), -1)
        raw[:, CtNotifyRec.type.offset] = abi.CT_NOTIFY_DESTROY
        raw[:, CtNotifyRec.reason.offset] = reason
        raw[:, CtNotifyRec.table.offset] = TABLE_OF.get(map_name, 0)
        prog = self.coll.programs[abi.NOTIFY_EMIT_PROGRAM]
        written = 0
        for s in range(0, len(recs), EMIT_MAX):
            part = recs[s:s + EMIT_MAX]
            r = prog.test_run(bytes(_ETH) + struct.pack("<I", len(part)) + part.tobytes())
            if r.retval < 0:
                raise TupletError(f"program {abi.NOTIFY_EMIT_PROGRAM}", "emit", detail=f"returned {r.retval}")
            written += r.retval
        return written

    def close(self) -> None:
        if self.coll is not None:
            self.coll.close()
            self.coll = None


def emitter_for(pin_root: str, stack: ExitStack, obj: Path) -> Callable[[str, np.ndarray, np.ndarray, int], int] | None:
    """An emit function when a listener is attached now, else None (then nothing is loaded)."""
    maps = open_maps(pin_root, stack)
    if not maps or not listening(maps[1]):
        return None
    em = Emitter(maps, obj)
    stack.callback(em.close)
    return em.emit


class Listener:
    """Attaches to the ring (sets the flag and the rate), yields decoded, filtered events."""

    def __init__(self, pin_root: str, flt: CtFilter, rate: int = DEFAULT_RATE, force: bool = False) -> None:
        self.stack = ExitStack()
        try:
            maps = open_maps(pin_root, self.stack)
            if not maps:
                raise TupletError(f"pinned map {pin_root}/{abi.NOTIFY_MAP}", "listen", errno.ENOENT,
                                  "this datapath has no event ring: `tuplet apply` with this build")
            self.ring, self.ctl, self.lost_map = maps
            with paths.open_pinned(pin_root, abi.CT_MAP_TCP) as tcp:
                self.layout = FilterLayout.of(tcp)
            self.dtype = rec_dtype(self.layout)
            self.flt = flt
            cur = _ctl(self.ctl)
            if cur.listeners and not force:
                raise TupletError(f"pinned map {pin_root}/{abi.NOTIFY_CTL_MAP}", "listen", errno.EBUSY,
                                  "another listener is attached (one reader per ring); --force if it died")
            self._pending: list[bytes] = []
            self.rb = self.stack.enter_context(RingBuffer(self.ring, self._pending.append))
            self.lost_at_start = lost(self.lost_map)
            self._set(1, rate)
            self.stack.callback(self._set, 0, rate)
        except BaseException:
            self.stack.close()
            raise

    def _set(self, listeners: int, rate: int) -> None:
        self.ctl.update(struct.pack("<I", 0), bytes(CtNotifyCtl(listeners, rate)))

    def lost(self) -> int:
        """Records not delivered since this listener attached."""
        return lost(self.lost_map) - self.lost_at_start

    def fileno(self) -> int:
        return self.rb.fileno()

    def poll_raw(self, timeout_ms: int) -> np.ndarray:
        """The matching records that arrived (numpy, :func:`rec_dtype`)."""
        self.rb.poll(timeout_ms)      # woken when a quarter of the ring waits, else times out
        self.rb.consume()             # the records written without a wake-up
        data, self._pending[:] = b"".join(self._pending), []
        recs: np.ndarray = np.frombuffer(data, self.dtype, count=len(data) // _REC)
        hit: np.ndarray = recs[self.flt.mask(self.layout, recs["tuple"], recs["entry"])]
        return hit

    def poll(self, timeout_ms: int) -> Iterator[tuple[str, str, CtRecord, int]]:
        """(type, reason, record, ktime_ns) of each matching event that arrived."""
        for r in self.poll_raw(timeout_ms):
            rec = CtRecord(CtTuple4.from_buffer_copy(r["tuple"].tobytes()),
                           CtEntry.from_buffer_copy(r["entry"].tobytes()), TABLES.get(int(r["table"]), "?"))
            yield TYPES.get(int(r["type"]), str(r["type"])), REASONS.get(int(r["reason"]), str(r["reason"])), \
                rec, int(r["ktime_ns"])

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
