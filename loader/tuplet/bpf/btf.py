"""A small pure-Python reader of BTF, the BPF Type Format (kernel Documentation/bpf/btf.rst).

tuplet reads the layout of its map keys and values and the names of its enums
(verdict reasons, ...) from the BTF of the compiled BPF objects, so the C headers
stay the only definition::

    btf = load_btf_from_elf("build/bpf_lxc.o")
    btf.struct_layout("ct_entry").size         # 56
    btf.numpy_dtype("ipv4_ct_tuple").itemsize  # 14
    btf.enum_values("tpl_reason")              # {"TPL_PASS_CT_NEW": 0, ...}

Raw blobs such as /sys/kernel/btf/vmlinux load with ``Btf.from_file``. Split BTF
(kernel modules' BTF on top of vmlinux) is not supported. Bitfield decoding
assumes little-endian data, as on x86-64 and BPF objects built for it.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from tuplet.core.errors import NotFoundError, TupletError

BTF_MAGIC = 0xEB9F
_HDR = "HBBIIIII"  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len


class BtfError(TupletError):
    """Invalid or truncated BTF, or a type that is not what the caller asked for."""

    def __init__(self, detail: str) -> None:
        super().__init__("BTF", detail=detail)


class BtfNotFoundError(BtfError, NotFoundError):
    """No type of the requested name (and kind)."""


class Kind(enum.IntEnum):
    """BTF_KIND_*; VOID is type id 0, which has no entry in the type section."""
    VOID, INT, PTR, ARRAY, STRUCT = range(5)
    UNION, ENUM, FWD, TYPEDEF, VOLATILE = range(5, 10)
    CONST, RESTRICT, FUNC, FUNC_PROTO, VAR = range(10, 15)
    DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(15, 20)


_MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_INT_SIGNED = 1  # INT encoding bits: SIGNED 1, CHAR 2, BOOL 4


# --- Types: one dataclass per shape; ``kind`` tells apart the kinds sharing one. ---

@dataclass(frozen=True)
class BtfType:
    id: int
    kind: Kind
    name: str


@dataclass(frozen=True)
class IntType(BtfType):
    size: int
    encoding: int  # SIGNED 1 | CHAR 2 | BOOL 4
    bit_offset: int
    bits: int

    @property
    def signed(self) -> bool:
        return bool(self.encoding & _INT_SIGNED)


@dataclass(frozen=True)
class RefType(BtfType):
    """PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG, FUNC (``linkage`` in ``extra``)."""
    type: int
    extra: int = 0


@dataclass(frozen=True)
class ArrayType(BtfType):
    type: int
    index_type: int
    nelems: int


@dataclass(frozen=True)
class Member:
    name: str
    type: int
    bit_offset: int
    bitfield_size: int  # 0: not a bitfield (or, without kind_flag, see the INT type)


@dataclass(frozen=True)
class CompositeType(BtfType):
    """STRUCT or UNION."""
    size: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class EnumType(BtfType):
    """ENUM or ENUM64."""
    size: int
    signed: bool
    values: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class FwdType(BtfType):
    is_union: bool


@dataclass(frozen=True)
class FuncProtoType(BtfType):
    ret: int
    params: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class VarType(BtfType):
    type: int
    linkage: int


@dataclass(frozen=True)
class DataSecType(BtfType):
    size: int
    vars: tuple[tuple[int, int, int], ...]  # (type id, offset, size)


@dataclass(frozen=True)
class FloatType(BtfType):
    size: int


@dataclass(frozen=True)
class DeclTagType(BtfType):
    type: int
    component_idx: int


VOID = BtfType(0, Kind.VOID, "void")


# --- Layouts. ---

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
    """How to pull a bitfield out of the ``storage`` field of a ``Btf.numpy_dtype`` record."""
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
        raise BtfNotFoundError(f"struct {self.name} has no member {name!r}")


TypeRef = Union[str, int]


class Btf:
    """A parsed BTF blob: ``types[i]`` is type id ``i`` (0 is void)."""

    def __init__(self, types: list[BtfType]) -> None:
        self.types = types
        self._by_name: dict[str, list[int]] = {}
        for t in types[1:]:
            if t.name:
                self._by_name.setdefault(t.name, []).append(t.id)

    # --- Loading. ---

    @classmethod
    def from_file(cls, path: str | Path) -> Btf:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Btf:
        data = bytes(data)
        if len(data) < struct.calcsize(_HDR):
            raise BtfError(f"truncated header ({len(data)} bytes)")
        for end in "<>":
            if struct.unpack_from(end + "H", data)[0] == BTF_MAGIC:
                break
        else:
            raise BtfError(f"bad magic 0x{int.from_bytes(data[:2], 'little'):04x}")
        _, version, _, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from(end + _HDR, data)
        if version != 1:
            raise BtfError(f"unsupported version {version}")
        if hdr_len < struct.calcsize(_HDR) or hdr_len + max(type_off + type_len,
                                                           str_off + str_len) > len(data):
            raise BtfError(f"truncated: header describes more than the {len(data)} bytes")
        strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        return cls(_parse_types(data[hdr_len + type_off:hdr_len + type_off + type_len],
                                strings, end))

    # --- Lookup. ---

    def __getitem__(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise BtfNotFoundError(f"no type id {type_id} (have {len(self.types) - 1})")
        return self.types[type_id]

    def __len__(self) -> int:
        return len(self.types)

    def find(self, name: str, kind: Kind | str | None = None) -> BtfType:
        """The first type called ``name`` ("struct foo" also works), never a FWD unless asked."""
        prefix, _, rest = name.partition(" ")
        if rest and kind is None and prefix in ("struct", "union", "enum"):
            name, kind = rest, prefix
        if isinstance(kind, str):
            try:
                kind = Kind[kind.upper()]
            except KeyError:
                raise BtfError(f"unknown kind {kind!r}") from None
        for tid in self._by_name.get(name, ()):
            t = self.types[tid]
            if (kind is None and t.kind != Kind.FWD) or t.kind == kind \
                    or (kind == Kind.ENUM and t.kind == Kind.ENUM64):
                return t
        what = f"{kind.name.lower()} {name}" if kind is not None else name
        raise BtfNotFoundError(f"no type {what}")

    def _get(self, ref: TypeRef) -> BtfType:
        return self[ref] if isinstance(ref, int) else self.find(ref)

    def resolve(self, ref: TypeRef) -> BtfType:
        """The type behind typedefs and const/volatile/restrict/type_tag modifiers."""
        t = self._get(ref)
        for _ in range(len(self.types)):
            if t.kind not in _MODIFIERS:
                return t
            assert isinstance(t, RefType)
            t = self[t.type]
        raise BtfError(f"modifier loop at type {t.id}")

    def sizeof(self, ref: TypeRef) -> int:
        t = self.resolve(ref)
        if isinstance(t, ArrayType):
            return t.nelems * self.sizeof(t.type)
        if isinstance(t, VarType):
            return self.sizeof(t.type)
        if t.kind == Kind.PTR:
            return 8
        size = getattr(t, "size", None)
        if size is None:
            raise BtfError(f"type {t.id} ({t.kind.name} {t.name or '(anon)'}) has no size")
        return int(size)

    def type_name(self, ref: TypeRef) -> str:
        """A C-like spelling: "__u32", "struct foo", "char *", "__u8[6]"."""
        t = self._get(ref)
        if isinstance(t, ArrayType):
            dims = ""
            while isinstance(t, ArrayType):
                dims += f"[{t.nelems}]"
                t = self[t.type]
            return self.type_name(t.id) + dims
        if isinstance(t, (CompositeType, EnumType, FwdType)):
            union = t.kind == Kind.UNION or (isinstance(t, FwdType) and t.is_union)
            tag = "enum" if isinstance(t, EnumType) else "union" if union else "struct"
            return f"{tag} {t.name or '(anon)'}"
        if isinstance(t, RefType) and t.kind not in (Kind.FUNC, Kind.TYPEDEF):
            inner = self.type_name(t.type)
            if t.kind == Kind.PTR:
                return inner + " *"
            return inner if t.kind == Kind.TYPE_TAG else f"{t.kind.name.lower()} {inner}"
        return t.name or f"({t.kind.name.lower()})"

    def _composite(self, ref: TypeRef) -> CompositeType:
        t = self.resolve(ref)
        if not isinstance(t, CompositeType):
            raise BtfError(f"{self.type_name(t.id)} is a {t.kind.name}, not a struct or union")
        return t

    def enum_values(self, ref: TypeRef) -> dict[str, int]:
        """Enumerator names to values of an ENUM or ENUM64 (or a typedef of one)."""
        t = self.resolve(ref)
        if not isinstance(t, EnumType):
            raise BtfError(f"{self.type_name(t.id)} is a {t.kind.name}, not an enum")
        return dict(t.values)

    # --- Layouts. ---

    def struct_layout(self, ref: TypeRef) -> StructLayout:
        """Members of a struct or union, nested anonymous structs/unions flattened."""
        st = self._composite(ref)
        flat = self._flatten(st, 0, st.size)
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
                t = self.resolve(type_id)
                signed = isinstance(t, (IntType, EnumType)) and t.signed
                bitfields.append(BitField(m.name, f"_bits_{start}", start, stop - start,
                                          m.bit_offset - 8 * start, m.bit_size, signed))
        return StructLayout(self.type_name(st.id), st.size, members, tuple(bitfields))

    def _flatten(self, st: CompositeType, base_bits: int,
                 limit: int) -> list[tuple[MemberLayout, int]]:
        """(layout, member type id) of each member, ``base_bits`` added to the offsets.
        ``limit`` is the size of the outermost struct, which storage units stay within."""
        out: list[tuple[MemberLayout, int]] = []
        for mem in st.members:
            t = self.resolve(mem.type)
            bit_off, bits = base_bits + mem.bit_offset, mem.bitfield_size
            if not mem.name and isinstance(t, CompositeType):
                out += self._flatten(t, bit_off, limit)
                continue
            if isinstance(t, IntType) and not bits and (t.bits != 8 * t.size or t.bit_offset):
                bit_off, bits = bit_off + t.bit_offset, t.bits  # bitfield without kind_flag
            size = self.sizeof(t.id)
            if not bits and bit_off % 8:
                bits = 8 * size
            start = bit_off // 8
            if bits:  # the storage unit: an aligned unit of the member's type ...
                start = bit_off // (8 * size) * size
                if bit_off + bits > 8 * (start + size) or start + size > limit:
                    start = bit_off // 8  # ... or, if packed, the bytes the bits span
                    size = (bit_off + bits + 7) // 8 - start
            out.append((MemberLayout(mem.name, start, size, bit_off, bits,
                                     self.type_name(mem.type)), mem.type))
        return out

    def numpy_dtype(self, ref: TypeRef, be_typedefs: bool = False) -> np.dtype:
        """A structured dtype with the struct's size and member offsets.

        Bitfields become their storage units, ``_bits_<byte offset>`` (decode them with
        ``StructLayout.bitfields``); members of anonymous unions overlap. Integers are
        little-endian unless ``be_typedefs`` maps ``__be16/32/64`` to big-endian.
        """
        st = self._composite(ref)
        fields: list[tuple[int, str, np.dtype]] = []  # (offset, name, dtype)
        for m, type_id in self._flatten(st, 0, st.size):
            if not m.is_bitfield:
                fields.append((m.offset_bytes, m.name, self._member_dtype(type_id, be_typedefs)))
        for bf in {bf.storage: bf for bf in self.struct_layout(st.id).bitfields}.values():
            n = bf.storage_size
            fields.append((bf.storage_offset, bf.storage,
                           np.dtype(f"<u{n}") if n in (1, 2, 4, 8) else np.dtype(("u1", (n,)))))
        fields.sort(key=lambda f: f[0])
        return np.dtype({"names": [f[1] for f in fields], "formats": [f[2] for f in fields],
                         "offsets": [f[0] for f in fields], "itemsize": st.size})

    def _member_dtype(self, type_id: int, be_typedefs: bool) -> np.dtype:
        order = "<"
        t = self[type_id]
        while isinstance(t, RefType) and t.kind in _MODIFIERS:
            if be_typedefs and t.kind == Kind.TYPEDEF and t.name in ("__be16", "__be32", "__be64"):
                order = ">"
            t = self[t.type]
        if isinstance(t, ArrayType):
            return np.dtype((self._member_dtype(t.type, be_typedefs), (t.nelems,)))
        if isinstance(t, CompositeType):
            return self.numpy_dtype(t.id, be_typedefs)
        if isinstance(t, (IntType, EnumType)) and t.size in (1, 2, 4, 8):
            return np.dtype(f"{order}{'i' if t.signed else 'u'}{t.size}")
        if isinstance(t, FloatType) and t.size in (2, 4, 8):
            return np.dtype(f"<f{t.size}")
        if t.kind == Kind.PTR:
            return np.dtype("<u8")
        return np.dtype(f"V{self.sizeof(t.id)}")


def _parse_types(data: bytes, strings: bytes, end: str) -> list[BtfType]:
    names: dict[int, str] = {}

    def name_at(off: int) -> str:
        s = names.get(off)
        if s is None:
            if off >= len(strings):
                raise BtfError(f"string offset {off} past the string section ({len(strings)})")
            stop = strings.find(b"\0", off)
            raw = strings[off:stop] if stop >= 0 else strings[off:]
            s = names[off] = raw.decode("utf-8", "replace")
        return s

    u32x3 = struct.Struct(end + "III")
    i_u32x3 = u32x3.iter_unpack
    types: list[BtfType] = [VOID]
    pos = 0
    while pos < len(data):
        tid = len(types)
        if pos + 12 > len(data):
            raise BtfError(f"truncated type {tid} at offset {pos}")
        name_off, info, size = u32x3.unpack_from(data, pos)
        pos += 12
        kind_no, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
        try:
            kind = Kind(kind_no)
        except ValueError:
            raise BtfError(f"type {tid}: unknown kind {kind_no}") from None
        name = name_at(name_off)
        extra = {Kind.INT: 4, Kind.ARRAY: 12, Kind.STRUCT: 12 * vlen, Kind.UNION: 12 * vlen,
                 Kind.ENUM: 8 * vlen, Kind.FUNC_PROTO: 8 * vlen, Kind.VAR: 4,
                 Kind.DATASEC: 12 * vlen, Kind.DECL_TAG: 4, Kind.ENUM64: 12 * vlen}.get(kind, 0)
        if pos + extra > len(data):
            raise BtfError(f"truncated type {tid} ({kind.name} {name!r}) at offset {pos - 12}")
        body = data[pos:pos + extra]
        pos += extra
        t: BtfType
        if kind == Kind.INT:
            (enc,) = struct.unpack(end + "I", body)
            t = IntType(tid, kind, name, size, (enc >> 24) & 0xF, (enc >> 16) & 0xFF, enc & 0xFF)
        elif kind == Kind.ARRAY:
            t = ArrayType(tid, kind, name, *u32x3.unpack(body))
        elif kind in (Kind.STRUCT, Kind.UNION):
            mems = tuple(Member(name_at(n), ty, off & 0xFFFFFF, off >> 24) if kflag
                         else Member(name_at(n), ty, off, 0) for n, ty, off in i_u32x3(body))
            t = CompositeType(tid, kind, name, size, mems)
        elif kind == Kind.ENUM:  # kind_flag: signed values
            fmt = end + ("Ii" if kflag else "II")
            vals = tuple((name_at(n), v) for n, v in struct.iter_unpack(fmt, body))
            t = EnumType(tid, kind, name, size, kflag, vals)
        elif kind == Kind.ENUM64:
            vals = tuple((name_at(n), _sign(lo | hi << 32, 64) if kflag else lo | hi << 32)
                         for n, lo, hi in i_u32x3(body))
            t = EnumType(tid, kind, name, size, kflag, vals)
        elif kind == Kind.FWD:
            t = FwdType(tid, kind, name, kflag)
        elif kind == Kind.FUNC_PROTO:
            t = FuncProtoType(tid, kind, name, size, tuple(
                (name_at(n), ty) for n, ty in struct.iter_unpack(end + "II", body)))
        elif kind == Kind.VAR:
            t = VarType(tid, kind, name, size, struct.unpack(end + "I", body)[0])
        elif kind == Kind.DATASEC:
            t = DataSecType(tid, kind, name, size, tuple(i_u32x3(body)))
        elif kind == Kind.FLOAT:
            t = FloatType(tid, kind, name, size)
        elif kind == Kind.DECL_TAG:
            t = DeclTagType(tid, kind, name, size, struct.unpack(end + "i", body)[0])
        else:  # PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG, FUNC
            t = RefType(tid, kind, name, size, vlen if kind == Kind.FUNC else 0)
        types.append(t)
    return types


def _sign(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def load_btf_from_elf(path: str | Path) -> Btf:
    """The ``.BTF`` section of an ELF64 object file (a compiled BPF object)."""
    data = Path(path).read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise BtfError(f"{path}: not an ELF file")
    if data[4] != 2:
        raise BtfError(f"{path}: not a 64-bit ELF file")
    end = {1: "<", 2: ">"}.get(data[5])
    if end is None:
        raise BtfError(f"{path}: bad ELF data encoding {data[5]}")
    shoff, = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
    sh = struct.Struct(end + "IIQQQQIIQQ")
    if shoff == 0 or shentsize < sh.size or shoff + shentsize > len(data):
        raise BtfError(f"{path}: no or truncated section header table")

    def section(i: int) -> tuple[int, int, int, int]:  # name, offset, size, link
        at = shoff + i * shentsize
        if at + sh.size > len(data):
            raise BtfError(f"{path}: truncated section header {i}")
        name, _, _, _, off, size, link, *_ = sh.unpack_from(data, at)
        return name, off, size, link

    _, _, size0, link0 = section(0)
    shnum = shnum or size0           # >= SHN_LORESERVE sections: count in section 0
    if shstrndx == 0xFFFF:           # SHN_XINDEX
        shstrndx = link0
    _, str_off, str_size, _ = section(shstrndx)
    names = data[str_off:str_off + str_size]
    for i in range(shnum):
        name_off, off, size, _ = section(i)
        if names[name_off:name_off + 5] == b".BTF\0":
            if off + size > len(data):
                raise BtfError(f"{path}: truncated .BTF section")
            return Btf.from_bytes(data[off:off + size])
    raise BtfNotFoundError(f"{path}: no .BTF section (build with -g)")
