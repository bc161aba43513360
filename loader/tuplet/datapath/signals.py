"""Signals the datapath sends the agent through its ring buffer (bpf/lib/signal.h).

The datapath rate-limits them (one per kind and CPU per second); the reader turns
each record into a :class:`Signal` with names from the object's BTF, and exposes a
file descriptor to wait on with select/poll alongside timers.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from tuplet.bpf.maps import Map
from tuplet.bpf.ringbuf import RingBuffer
from tuplet.datapath import enums
from tuplet.datapath.layouts import TplSignal


@dataclass(frozen=True)
class Signal:
    kind: str         # e.g. "CT_FILL_UP"
    arg: str | int    # for CT_FILL_UP: the table ("MAP_TCP", "MAP_ANY")
    cpu: int
    ktime_ns: int


def signal_names(obj_path: str) -> tuple[dict[int, str], dict[int, str]]:
    """(kind names, map names) from the object's BTF."""
    return enums.object_names(obj_path, enums.SIGNAL_KINDS), enums.object_names(obj_path, enums.SIGNAL_MAPS)


class SignalReader:
    """Consumes the signal ring buffer. Not thread-safe; one reader per ring."""

    def __init__(self, ring: Map, obj_path: str) -> None:
        self._kinds, self._maps = signal_names(obj_path)
        self._pending: list[Signal] = []
        self._ring = RingBuffer(ring, self._on_record)

    def _on_record(self, data: bytes) -> None:
        if len(data) < ctypes.sizeof(TplSignal):
            return
        s = TplSignal.from_buffer_copy(data[:ctypes.sizeof(TplSignal)])
        kind = self._kinds.get(s.kind, f"kind_{s.kind}")
        arg: str | int = self._maps.get(s.arg, s.arg) if kind == "CT_FILL_UP" else s.arg
        self._pending.append(Signal(kind, arg, s.cpu, s.ktime_ns))

    def fileno(self) -> int:
        """An fd that becomes readable when records are waiting."""
        return self._ring.fileno()

    def poll(self, timeout_ms: int = 0) -> list[Signal]:
        """Wait up to ``timeout_ms`` (0: don't wait) and return the signals that arrived."""
        self._ring.poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        self._ring.close()

    def __enter__(self) -> "SignalReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
