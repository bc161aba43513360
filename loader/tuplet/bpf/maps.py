"""BPF maps by file descriptor: lookups, updates, deletes and batch iteration.

Keys and values are raw bytes (or anything supporting the buffer protocol, such as
ctypes structures and numpy arrays); :mod:`tuplet.datapath.layouts` gives them meaning.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Iterator

from tuplet.bpf import _libbpf as C
from tuplet.bpf.btf import Btf
from tuplet.bpf.fd import Fd, Lifetime
from tuplet.bpf.libbpf import check, cstr, opts
from tuplet.core.errors import NotFoundError, TupletError

PERCPU_TYPES = {C.BPF_MAP_TYPE_PERCPU_HASH, C.BPF_MAP_TYPE_PERCPU_ARRAY,
                C.BPF_MAP_TYPE_LRU_PERCPU_HASH}
BATCH_TYPES_WITH_BUCKETS = {C.BPF_MAP_TYPE_HASH, C.BPF_MAP_TYPE_LRU_HASH,
                            C.BPF_MAP_TYPE_PERCPU_HASH, C.BPF_MAP_TYPE_LRU_PERCPU_HASH}

HASH_TYPES = {C.BPF_MAP_TYPE_HASH, C.BPF_MAP_TYPE_LRU_HASH, C.BPF_MAP_TYPE_PERCPU_HASH,
              C.BPF_MAP_TYPE_LRU_PERCPU_HASH, C.BPF_MAP_TYPE_HASH_OF_MAPS}
#: Update flags (``Map.update``): any, only a new key, only an existing key.
ANY, NOEXIST, EXIST = C.BPF_ANY, C.BPF_NOEXIST, C.BPF_EXIST
ARRAY, RINGBUF = C.BPF_MAP_TYPE_ARRAY, C.BPF_MAP_TYPE_RINGBUF
#: Map flag: the map may be an inner map of map-in-maps with other max_entries.
F_INNER_MAP = C.BPF_F_INNER_MAP

MAP_TYPE_NAMES = {getattr(C, n): n[len("BPF_MAP_TYPE_"):].lower()
                  for n in dir(C) if n.startswith("BPF_MAP_TYPE_") and isinstance(getattr(C, n), int)}


def possible_cpus() -> int:
    """Number of possible CPUs, the per-CPU value count the kernel uses."""
    n = int(C.libbpf_num_possible_cpus())
    if n <= 0:
        raise TupletError("possible CPUs", "count", -n)
    return n


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says a map is."""

    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf_id: int
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))

    @property
    def is_hash(self) -> bool:
        """A hash map (entries come and go; an array is always full)."""
        return self.type in HASH_TYPES


class Map:
    """A map held by fd: its own, or one borrowed from a loaded collection (``borrowed_from``),
    unusable once that collection is closed."""

    def __init__(self, fd: int, name: str = "", borrowed_from: Lifetime | None = None) -> None:
        self._fd = Fd(fd, f"map {name}", borrowed_from)
        self.info = map_info(fd)
        self.name = name or self.info.name
        self.what = f"map {self.name}"
        self.percpu = self.info.type in PERCPU_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        # Per-CPU values are laid out 8-byte aligned, one per possible CPU.
        self.value_stride = (self.info.value_size + 7) // 8 * 8 if self.percpu else self.info.value_size
        self.value_buf_size = self.value_stride * self.ncpus

    @classmethod
    def from_pin(cls, path: str) -> "Map":
        fd = C.bpf_obj_get(cstr(path))
        if fd < 0:
            err = ctypes.get_errno()
            raise (NotFoundError if err == errno.ENOENT else TupletError)(f"pinned map {path}", "open", err)
        return cls(fd, os.path.basename(path))

    @classmethod
    def from_id(cls, map_id: int, name: str = "") -> "Map":
        fd = C.bpf_map_get_fd_by_id(map_id)
        if fd < 0:
            err = ctypes.get_errno()
            raise (NotFoundError if err == errno.ENOENT else TupletError)(f"map id {map_id}", "open", err)
        return cls(fd, name)

    @classmethod
    def create(cls, map_type: int, name: str, key_size: int, value_size: int, max_entries: int, *,
               flags: int = 0, btf_of: "Map | None" = None, btf_key_type_id: int = 0,
               btf_value_type_id: int = 0) -> "Map":
        """A new map not tied to any object (e.g. an inner map of a map-in-map). With
        ``btf_of``, it carries that map's BTF, with these key and value type ids."""
        btf_fd = -1
        if btf_of is not None and btf_of.info.btf_id:
            btf_fd = check(C.bpf_btf_get_fd_by_id(btf_of.info.btf_id),
                           f"BTF id {btf_of.info.btf_id} of {btf_of.what}", "open")
        try:
            o = opts(C.bpf_map_create_opts, map_flags=flags, btf_fd=max(btf_fd, 0),
                     btf_key_type_id=btf_key_type_id if btf_fd >= 0 else 0,
                     btf_value_type_id=btf_value_type_id if btf_fd >= 0 else 0)
            fd = check(C.bpf_map_create(map_type, cstr(name[:15]), key_size, value_size, max_entries,
                                        ctypes.byref(o)), f"map {name}", "create")
        finally:
            if btf_fd >= 0:
                os.close(btf_fd)
        return cls(fd, name)

    def create_like(self, max_entries: int) -> "Map":
        """A new, empty map like this one (type, key/value size, flags, BTF) with another size."""
        i = self.info
        return Map.create(i.type, i.name or self.name, i.key_size, i.value_size, max_entries, flags=i.flags,
                          btf_of=self, btf_key_type_id=i.btf_key_type_id, btf_value_type_id=i.btf_value_type_id)

    def pin(self, path: str) -> None:
        check(C.bpf_obj_pin(self.fd, cstr(path)), self.what, f"pin at {path}")

    @property
    def fd(self) -> int:
        return self._fd.fd

    @property
    def key_size(self) -> int:
        return self.info.key_size

    @property
    def value_size(self) -> int:
        return self.info.value_size

    @property
    def max_entries(self) -> int:
        return self.info.max_entries

    def btf(self) -> "Btf":
        """The BTF the map was created with (libbpf loads it from the kernel, by id)."""
        if not self.info.btf_id:
            raise NotFoundError(self.what, "get BTF", errno.ENOENT, "map has no BTF")
        return Btf.from_kernel(self.info.btf_id, f"BTF of {self.what}")

    def close(self) -> None:
        self._fd.close()

    def __enter__(self) -> "Map":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- single-key operations -----------------------------------------------------------------

    def _key(self, key: bytes | ctypes.Structure | int) -> ctypes.Array[ctypes.c_char]:
        if isinstance(key, int):
            key = key.to_bytes(self.key_size, "little")
        raw = bytes(key)
        if len(raw) != self.key_size:
            raise TupletError(self.what, "key", detail=f"key is {len(raw)} bytes, map wants {self.key_size}")
        return (ctypes.c_char * len(raw)).from_buffer_copy(raw)

    def lookup(self, key: bytes | ctypes.Structure | int) -> bytes | None:
        """The value for key (all CPUs' values concatenated for per-CPU maps), or None."""
        k = self._key(key)
        v = ctypes.create_string_buffer(self.value_buf_size)
        ret = C.bpf_map_lookup_elem(self.fd, k, v)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            check(ret, self.what, "lookup")
        return v.raw

    def lookup_into(self, key: bytes, buf: ctypes.Array[ctypes.c_char]) -> bool:
        """Look key up into ``buf`` (a value-sized buffer the caller reuses); False if absent."""
        ret = C.bpf_map_lookup_elem(self.fd, key, buf)
        if ret < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return False
            check(ret, self.what, "lookup")
        return True

    def insert(self, key: bytes | ctypes.Structure | int, value: bytes | ctypes.Structure) -> bool:
        """Add key only if it is not there (BPF_NOEXIST); False when it was."""
        try:
            self.update(key, value, NOEXIST)
            return True
        except TupletError as e:
            if e.errno == errno.EEXIST:
                return False
            raise

    def update(self, key: bytes | ctypes.Structure | int, value: bytes | ctypes.Structure,
               flags: int = 0) -> None:
        raw = bytes(value)
        if len(raw) != self.value_buf_size:
            raise TupletError(self.what, "update",
                              detail=f"value is {len(raw)} bytes, map wants {self.value_buf_size}")
        v = (ctypes.c_char * len(raw)).from_buffer_copy(raw)
        check(C.bpf_map_update_elem(self.fd, self._key(key), v, flags), self.what, "update")

    def delete(self, key: bytes | ctypes.Structure | int) -> bool:
        """Delete key; False when it was not there."""
        ret = C.bpf_map_delete_elem(self.fd, self._key(key))
        if ret < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return False
            check(ret, self.what, "delete")
        return True

    def keys(self) -> Iterator[bytes]:
        """Keys by get_next_key (one syscall per key; see :meth:`batches` for bulk reads)."""
        cur = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = C.bpf_map_get_next_key(self.fd, cur, nxt)
            if ret < 0:
                if ctypes.get_errno() == errno.ENOENT:
                    return
                check(ret, self.what, "get next key")
            key = nxt.raw
            yield key
            cur = ctypes.create_string_buffer(key, self.key_size)

    # --- batch operations ----------------------------------------------------------------------

    def batch_buffers(self, n: int) -> "BatchBuffers":
        return BatchBuffers(self, n)

    def lookup_batch(self, buf: "BatchBuffers", start: bytes | None) -> tuple[int, bytes | None]:
        """One BPF_MAP_LOOKUP_BATCH from token ``start`` (None: the beginning) into buf.

        Returns (count, next token or None at the end). When one hash bucket holds more
        entries than buf, the kernel answers ENOSPC: buf grows and the call is retried.
        """
        tok_size = buf.token_size
        in_tok = ctypes.create_string_buffer(start, tok_size) if start is not None else None
        out_tok = ctypes.create_string_buffer(tok_size)
        o = opts(C.bpf_map_batch_opts)
        while True:
            count = ctypes.c_uint32(buf.n)
            ret = C.bpf_map_lookup_batch(self.fd, in_tok, out_tok, buf.keys, buf.values,
                                         ctypes.byref(count), ctypes.byref(o))
            err = ctypes.get_errno() if ret < 0 else 0
            if err == errno.ENOSPC and count.value == 0:
                buf.grow()
                continue
            if ret < 0 and err not in (errno.ENOENT, errno.ENOSPC):
                check(ret, self.what, "batch lookup")
            return count.value, (None if err == errno.ENOENT else out_tok.raw)

    def lookup_chunks(self, buf: "BatchBuffers") -> Iterator[int]:
        """Walk the whole map, one BPF_MAP_LOOKUP_BATCH of at most ``buf.n`` entries per
        step, into ``buf`` (reused: read it before asking for the next step). Yields each
        step's count (never 0). Every chunked reader of this project (GC, flushes, resize,
        :meth:`batches`, :meth:`clear`) walks a map through this loop.
        """
        token: bytes | None = None
        while True:
            count, token = self.lookup_batch(buf, token)
            if count:
                yield count
            if token is None:
                return

    def batches(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes, int]]:
        """Read the whole map with BPF_MAP_LOOKUP_BATCH.

        Yields ``(keys, values, count)`` with keys and values packed back to back. ENOSPC
        grows the buffer (see :meth:`lookup_batch`); ENOENT ends the walk, its partial
        result still yielded.
        """
        buf = self.batch_buffers(max(1, chunk))
        for c in self.lookup_chunks(buf):
            yield buf.keys.raw[: c * self.key_size], buf.values.raw[: c * self.value_buf_size], c

    def items(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs, read in batches."""
        ks, vs = self.key_size, self.value_buf_size
        for keys, vals, count in self.batches(chunk):
            for i in range(count):
                yield keys[i * ks:(i + 1) * ks], vals[i * vs:(i + 1) * vs]

    def update_batch(self, keys: bytes, values: bytes, count: int, flags: int = 0) -> None:
        """Insert or update ``count`` packed key/value pairs with BPF_MAP_UPDATE_BATCH."""
        n = ctypes.c_uint32(count)
        o = opts(C.bpf_map_batch_opts, elem_flags=flags)
        k = (ctypes.c_char * len(keys)).from_buffer_copy(keys)
        v = (ctypes.c_char * len(values)).from_buffer_copy(values)
        check(C.bpf_map_update_batch(self.fd, k, v, ctypes.byref(n), ctypes.byref(o)), self.what, "batch update")

    def delete_batch(self, keys: bytes, count: int) -> int:
        """Delete ``count`` packed keys with BPF_MAP_DELETE_BATCH.

        The kernel stops at the first key that is already gone (ENOENT); the remaining
        keys are then deleted one by one. Returns how many keys were deleted.
        """
        ks = self.key_size
        deleted = 0
        start = 0
        o = opts(C.bpf_map_batch_opts)
        while start < count:
            n = ctypes.c_uint32(count - start)
            buf = ctypes.create_string_buffer(keys[start * ks: count * ks], (count - start) * ks)
            ret = C.bpf_map_delete_batch(self.fd, buf, ctypes.byref(n), ctypes.byref(o))
            deleted += n.value
            start += n.value
            if ret == 0:
                break
            if ctypes.get_errno() != errno.ENOENT:
                check(ret, self.what, "batch delete")
            start += 1  # skip the key that was already gone
        return deleted

    def clear(self, chunk: int = 2048) -> int:
        """Delete every entry, a chunk read and deleted at a time (each system call handles
        at most ``chunk`` entries, so none holds the CPU long). Returns how many were deleted."""
        total = 0
        for keys, _, count in self.batches(chunk):
            total += self.delete_batch(keys, count)
        return total

    def count(self) -> int:
        return sum(c for _, _, c in self.batches())


class BatchBuffers:
    """Key and value buffers for batch lookups of one map; ``grow()`` doubles them."""

    def __init__(self, m: Map, n: int) -> None:
        self.map = m
        self.token_size = max(m.key_size, 8)
        self.n = 0
        self.grow(n)

    def grow(self, n: int | None = None) -> None:
        self.n = n if n is not None else self.n * 2
        self.keys = ctypes.create_string_buffer(self.map.key_size * self.n)
        self.values = ctypes.create_string_buffer(self.map.value_buf_size * self.n)


def map_info(fd: int) -> MapInfo:
    info = C.bpf_map_info()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(C.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"map fd {fd}", "get info")
    return MapInfo(id=info.id, name=bytes(info.name).split(b"\0", 1)[0].decode(), type=info.type,
                   key_size=info.key_size, value_size=info.value_size,
                   max_entries=info.max_entries, flags=info.map_flags, btf_id=info.btf_id,
                   btf_key_type_id=info.btf_key_type_id, btf_value_type_id=info.btf_value_type_id)
