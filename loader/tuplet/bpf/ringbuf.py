"""A BPF ring buffer map read with libbpf's ring_buffer: records handed to a callback, and
an fd to wait on with select/poll beside timers."""
from __future__ import annotations

import ctypes
import errno
from typing import Callable

from tuplet.bpf import _libbpf as C
from tuplet.bpf.libbpf import check, check_ptr, errno_of
from tuplet.bpf.maps import RINGBUF, Map
from tuplet.core.errors import TupletError


class RingBuffer:
    """Consumes one ring buffer map; ``on_record`` gets each record's bytes. Not thread-safe."""

    def __init__(self, ring: Map, on_record: Callable[[bytes], None]) -> None:
        if ring.info.type != RINGBUF:
            raise TupletError(ring.what, "read records", detail="not a ring buffer")
        self.what = ring.what
        self._on_record = on_record
        self._cb = C.ring_buffer_sample_fn(self._on_sample)   # keep a reference: libbpf calls it
        self._rb: ctypes.c_void_p | None = check_ptr(C.ring_buffer__new(ring.fd, self._cb, None, None),
                                                     ring.what, "open ring buffer")

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        self._on_record(ctypes.string_at(data, size))
        return 0

    def _handle(self) -> ctypes.c_void_p:
        if self._rb is None:
            raise TupletError(self.what, "read records", errno.EBADF, "ring buffer is closed")
        return self._rb

    def fileno(self) -> int:
        """An fd that becomes readable when records are waiting."""
        return int(C.ring_buffer__epoll_fd(self._handle()))

    def poll(self, timeout_ms: int = 0) -> None:
        """Wait up to ``timeout_ms`` (0: don't wait) and hand every waiting record over."""
        ret = C.ring_buffer__poll(self._handle(), timeout_ms)
        if ret < 0 and errno_of(ret) != errno.EINTR:
            check(ret, self.what, "poll")

    def consume(self) -> None:
        """Hand over every waiting record without waiting: for writers that submit without
        a wake-up (BPF_RB_NO_WAKEUP), which poll() alone would leave unread."""
        ret = C.ring_buffer__consume(self._handle())
        if ret < 0:
            check(ret, self.what, "consume")

    def close(self) -> None:
        if self._rb is not None:
            C.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> "RingBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
