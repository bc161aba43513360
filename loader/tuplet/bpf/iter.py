"""BPF iterators read in slices: an ``iter/bpf_map_elem`` program attached to one map, or an
iterator over kernel objects (``iter/udp``: the UDP sockets of the network namespace the
iterator is opened in).

The kernel runs the program once per element while a ``read()`` of the iterator's file is
in progress and returns from ``read()`` once the bytes the program wrote fill the caller's
buffer (or after a million elements). A program that writes one byte per element therefore
visits at most ``size`` elements per ``read(size)``: the work of one system call, and the
time the CPU is held without a chance to schedule, is bounded by the read size.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterator

from tuplet.bpf import _libbpf as C
from tuplet.bpf.fd import Fd
from tuplet.bpf.libbpf import check, opts
from tuplet.bpf.maps import Map
from tuplet.bpf.programs import Program


class IterLink:
    """An iterator link of ``prog``: each :meth:`slices` is one iteration."""

    def __init__(self, prog: Program, what: str = "", info: C.bpf_iter_link_info | None = None) -> None:
        what = what or f"iterator {prog.name}"
        o = opts(C.bpf_link_create_opts, iter_info=ctypes.pointer(info), iter_info_len=ctypes.sizeof(info)) \
            if info is not None else opts(C.bpf_link_create_opts)
        fd = check(C.bpf_link_create(prog.fd, 0, C.BPF_TRACE_ITER, ctypes.byref(o)), what, "create link")
        self._link = Fd(fd, what)
        self.what = what

    def slices(self, size: int) -> Iterator[memoryview]:
        """One full iteration: each slice is what one ``read(size)`` returned (never empty)."""
        fd = Fd(check(C.bpf_iter_create(self._link.fd), self.what, "open"), self.what)
        buf = bytearray(size)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = os.readv(fd.fd, [buf])
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.EAGAIN:   # a million elements and nothing written yet
                        continue
                    raise
                if n == 0:
                    return
                yield view[:n]
        finally:
            fd.close()

    def close(self) -> None:
        self._link.close()

    def __enter__(self) -> "IterLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MapIterLink(IterLink):
    """An iterator link: ``prog`` (an ``iter/bpf_map_elem`` program) bound to map ``m``."""

    def __init__(self, prog: Program, m: Map) -> None:
        info = C.bpf_iter_link_info()
        info.map.map_fd = m.fd
        super().__init__(prog, f"iterator {prog.name} on map {m.name}", info)
