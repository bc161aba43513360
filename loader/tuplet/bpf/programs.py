"""Loaded BPF programs: identity, pinning and BPF_PROG_TEST_RUN."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from tuplet.bpf import _libbpf as C
from tuplet.bpf.fd import Fd, Lifetime
from tuplet.bpf.libbpf import check, cstr, opts


@dataclass(frozen=True)
class TestRun:
    """Result of one BPF_PROG_TEST_RUN."""

    retval: int
    duration_ns: int   # mean per repetition, as the kernel reports it
    data: bytes        # the packet as the program left it


@dataclass(frozen=True)
class ProgramInfo:
    id: int
    name: str
    tag: str


class Program:
    """A loaded program held by fd: its own, or one borrowed from a loaded collection
    (``borrowed_from``), unusable once that collection is closed."""

    def __init__(self, fd: int, name: str, borrowed_from: Lifetime | None = None) -> None:
        self._fd = Fd(fd, f"program {name}", borrowed_from)
        self.name = name
        self.what = f"program {name}"

    @classmethod
    def from_pin(cls, path: str) -> "Program":
        fd = C.bpf_obj_get(cstr(path))
        check(fd, f"pinned program {path}", "open")
        return cls(fd, path.rsplit("/", 1)[-1])

    @classmethod
    def from_id(cls, prog_id: int, name: str = "") -> "Program":
        """The loaded program with this id (its own fd)."""
        fd = C.bpf_prog_get_fd_by_id(prog_id)
        check(fd, f"program id {prog_id}", "open")
        return cls(fd, name or f"id {prog_id}")

    @property
    def fd(self) -> int:
        return self._fd.fd

    def info(self) -> ProgramInfo:
        info = C.bpf_prog_info()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(C.bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size)), self.what, "get info")
        return ProgramInfo(id=info.id, name=bytes(info.name).split(b"\0", 1)[0].decode(),
                           tag=bytes(info.tag).hex())

    def pin(self, path: str) -> None:
        check(C.bpf_obj_pin(self.fd, cstr(path)), self.what, f"pin at {path}")

    def test_run(self, packet: bytes, repeat: int = 1, out_size: int | None = None) -> TestRun:
        """Run the program on ``packet`` with BPF_PROG_TEST_RUN."""
        size = out_size if out_size is not None else max(len(packet) + 256, 1514)
        data_in = ctypes.create_string_buffer(packet, len(packet))
        data_out = ctypes.create_string_buffer(size)
        o = opts(C.bpf_test_run_opts, data_in=ctypes.cast(data_in, ctypes.c_void_p),
                 data_size_in=len(packet), data_out=ctypes.cast(data_out, ctypes.c_void_p),
                 data_size_out=size, repeat=repeat)
        check(C.bpf_prog_test_run_opts(self.fd, ctypes.byref(o)), self.what, "test run")
        return TestRun(retval=o.retval, duration_ns=o.duration, data=data_out.raw[: o.data_size_out])

    def close(self) -> None:
        self._fd.close()
