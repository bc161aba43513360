"""Struct layouts and numpy dtypes derived from BTF (read with :mod:`tuplet.bpf.btf`).

Bitfield decoding assumes little-endian data, as on x86-64 and BPF objects built for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tuplet.bpf.btf import MODIFIERS, BtfNotFoundError, Kind, TypeRef

if TYPE_CHECKING:
    from tuplet.bpf.btf import Btf, BtfType


@dataclass(frozen=True)
class MemberLayout:
    """One member of a struct, anonymous members flattened. ``bit_offset`` counts from the
    start of the outermost struct; ``bit_size`` is 0 unless the member is a bitfield, in
    which case ``offset_bytes``/``size_bytes`` give the storage unit holding it."""
    name: str
    offset_bytes: int
    size_bytes: int
    bit_offset: int
    bit_size: int
    type_name: str

    @property
    def is_bitfield(self) -> bool:
        return self.bit_size != 0


@dataclass(frozen=True)
class BitField:
    """How to pull a bitfield out of the ``storage`` field of a ``numpy_dtype`` record."""
    name: str
    storage: str  # dtype field name, "_bits_<byte offset>"
    storage_offset: int
    storage_size: int
    shift: int  # bit position inside the storage unit (little-endian)
    bit_size: int
    signed: bool = False

    def extract(self, value: Any) -> Any:
        """Decode from the storage unit's integer value (int or numpy array)."""
        raw = (value >> self.shift) & ((1 << self.bit_size) - 1)
        if self.signed:
            if isinstance(raw, (np.ndarray, np.integer)):
                raw = raw.astype(np.int64)
            sign = 1 << (self.bit_size - 1)
            raw = (raw ^ sign) - sign
        return raw

    def get(self, record: Any) -> Any:
        """Decode from a numpy structured record or array of the struct's dtype."""
        value = record[self.storage]
        if self.storage_size not in (1, 2, 4, 8):  # a u1 subarray: assemble it
            value = sum(value[..., i].astype(np.uint64) << np.uint64(8 * i)
                        for i in range(self.storage_size))
        return self.extract(value)


@dataclass(frozen=True)
class StructLayout:
    name: str
    size: int
    members: tuple[MemberLayout, ...]
    bitfields: tuple[BitField, ...]

    def member(self, name: str) -> MemberLayout:
        for m in self.members:
            if m.name == name:
                return m
        raise BtfNotFoundError(self.name, f"find member {name!r}", detail="no such member")


def struct_layout(btf: Btf, ref: TypeRef) -> StructLayout:
    """Members of a struct or union, nested anonymous structs/unions flattened."""
    st = btf.composite(ref)
    flat = _flatten(btf, st, 0, st.size)
    members = tuple(m for m, _ in flat)
    # Storage of the bitfields: their units, overlapping ones merged.
    spans: list[tuple[int, int]] = []
    for start, stop in sorted({(m.offset_bytes, m.offset_bytes + m.size_bytes)
                               for m in members if m.is_bitfield}):
        if spans and start < spans[-1][1]:
            spans[-1] = (spans[-1][0], max(stop, spans[-1][1]))
        else:
            spans.append((start, stop))
    bitfields = []
    for m, type_id in flat:
        if m.is_bitfield:
            start, stop = next(sp for sp in spans if sp[0] <= m.offset_bytes < sp[1])
            bitfields.append(BitField(m.name, f"_bits_{start}", start, stop - start,
                                      m.bit_offset - 8 * start, m.bit_size, btf.resolve(type_id).signed))
    return StructLayout(btf.type_name(st.id), st.size, members, tuple(bitfields))


def _flatten(btf: Btf, st: BtfType, base_bits: int, limit: int) -> list[tuple[MemberLayout, int]]:
    """(layout, member type id) of each member, ``base_bits`` added to the offsets.
    ``limit`` is the size of the outermost struct, which storage units stay within."""
    out: list[tuple[MemberLayout, int]] = []
    for mem in btf.members(st.id):
        t = btf.resolve(mem.type)
        bit_off, bits = base_bits + mem.bit_offset, mem.bitfield_size
        if not mem.name and t.kind in (Kind.STRUCT, Kind.UNION):
            out += _flatten(btf, t, bit_off, limit)
            continue
        if t.kind == Kind.INT and not bits and (t.bits != 8 * t.size or t.bit_offset):
            bit_off, bits = bit_off + t.bit_offset, t.bits  # bitfield without kind_flag
        size = btf.sizeof(t.id)
        if not bits and bit_off % 8:
            bits = 8 * size
        start = bit_off // 8
        if bits:  # the storage unit: an aligned unit of the member's type ...
            start = bit_off // (8 * size) * size
            if bit_off + bits > 8 * (start + size) or start + size > limit:
                start = bit_off // 8  # ... or, if packed, the bytes the bits span
                size = (bit_off + bits + 7) // 8 - start
        out.append((MemberLayout(mem.name, start, size, bit_off, bits,
                                 btf.type_name(mem.type)), mem.type))
    return out


def numpy_dtype(btf: Btf, ref: TypeRef, be_typedefs: bool = False) -> np.dtype[Any]:
    """A structured dtype with the struct's size and member offsets.

    Bitfields become their storage units, ``_bits_<byte offset>`` (decode them with
    ``StructLayout.bitfields``); members of anonymous unions overlap. Integers are
    little-endian unless ``be_typedefs`` maps ``__be16/32/64`` to big-endian.
    """
    st = btf.composite(ref)
    fields: list[tuple[int, str, np.dtype[Any]]] = []  # (offset, name, dtype)
    for m, type_id in _flatten(btf, st, 0, st.size):
        if not m.is_bitfield:
            fields.append((m.offset_bytes, m.name, _member_dtype(btf, type_id, be_typedefs)))
    for bf in {bf.storage: bf for bf in struct_layout(btf, st.id).bitfields}.values():
        n = bf.storage_size
        fields.append((bf.storage_offset, bf.storage,
                       np.dtype(f"<u{n}") if n in (1, 2, 4, 8) else np.dtype(("u1", (n,)))))
    fields.sort(key=lambda f: f[0])
    return np.dtype({"names": [f[1] for f in fields], "formats": [f[2] for f in fields],
                     "offsets": [f[0] for f in fields], "itemsize": st.size})


def _member_dtype(btf: Btf, type_id: int, be_typedefs: bool) -> np.dtype[Any]:
    order = "<"
    t = btf[type_id]
    while t.kind in MODIFIERS:
        if be_typedefs and t.kind == Kind.TYPEDEF and t.name in ("__be16", "__be32", "__be64"):
            order = ">"
        t = btf[t.type]
    if t.kind == Kind.ARRAY:
        return np.dtype((_member_dtype(btf, t.type, be_typedefs), (t.nelems,)))
    if t.kind in (Kind.STRUCT, Kind.UNION):
        return numpy_dtype(btf, t.id, be_typedefs)
    if t.kind in (Kind.INT, Kind.ENUM, Kind.ENUM64) and t.size in (1, 2, 4, 8):
        return np.dtype(f"{order}{'i' if t.signed else 'u'}{t.size}")
    if t.kind == Kind.FLOAT and t.size in (2, 4, 8):
        return np.dtype(f"<f{t.size}")
    if t.kind == Kind.PTR:
        return np.dtype("<u8")
    return np.dtype(f"V{btf.sizeof(t.id)}")
