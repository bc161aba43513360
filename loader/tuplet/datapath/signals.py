"""Signals the datapath sends the agent through its ring buffer (bpf/lib/signal.h).

The datapath rate-limits them (one per kind and CPU per second); the reader turns
each record into a :class:`Signal` with names from the object's BTF, and exposes a
file descriptor to wait on with select/poll alongside timers.
"""
from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from functools import lru_cache

from tuplet.bpf import _libbpf as C
from tuplet.bpf.btf import load_btf_from_elf
from tuplet.bpf.libbpf import check, check_ptr, errno_of
from tuplet.bpf.maps import Map
from tuplet.core.errors import TupletError
from tuplet.datapath.layouts import TplSignal


@dataclass(frozen=True)
class Signal:
    kind: str         # e.g. "CT_FILL_UP"
    arg: str | int    # for CT_FILL_UP: the table ("MAP_TCP", "MAP_ANY")
    cpu: int
    ktime_ns: int


@lru_cache(maxsize=4)
def signal_names(obj_path: str) -> tuple[dict[int, str], dict[int, str]]:
    """(kind names, map names) from the object's BTF."""
    btf = load_btf_from_elf(obj_path)
    kinds = {v: k.removeprefix("TPL_SIGNAL_") for k, v in btf.enum_values("tpl_signal_kind").items()
             if k != "TPL_SIGNAL_KINDS"}
    maps = {v: k.removeprefix("TPL_SIGNAL_") for k, v in btf.enum_values("tpl_signal_map").items()}
    return kinds, maps


class SignalReader:
    """Consumes the signal ring buffer. Not thread-safe; one reader per ring."""

    def __init__(self, ring: Map, obj_path: str) -> None:
        if ring.info.type != C.BPF_MAP_TYPE_RINGBUF:
            raise TupletError(ring.what, "read signals", detail="not a ring buffer")
        self._kinds, self._maps = signal_names(obj_path)
        self._pending: list[Signal] = []
        self._cb = C.ring_buffer_sample_fn(self._on_sample)   # keep a reference: libbpf calls it
        rb = C.ring_buffer__new(ring.fd, self._cb, None, None)
        self._rb = check_ptr(rb, ring.what, "open ring buffer")

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        if size < ctypes.sizeof(TplSignal):
            return 0
        s = TplSignal.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(TplSignal)))
        kind = self._kinds.get(s.kind, f"kind_{s.kind}")
        arg: str | int = self._maps.get(s.arg, s.arg) if kind == "CT_FILL_UP" else s.arg
        self._pending.append(Signal(kind, arg, s.cpu, s.ktime_ns))
        return 0

    def fileno(self) -> int:
        """An fd that becomes readable when records are waiting."""
        return C.ring_buffer__epoll_fd(self._rb)

    def poll(self, timeout_ms: int = 0) -> list[Signal]:
        """Wait up to ``timeout_ms`` (0: don't wait) and return the signals that arrived."""
        ret = C.ring_buffer__poll(self._rb, timeout_ms)
        if ret < 0 and errno_of(ret) != errno.EINTR:
            check(ret, "signal ring buffer", "poll")
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        if self._rb:
            C.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> "SignalReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
