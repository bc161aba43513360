"""BTF, the BPF Type Format, read through libbpf's BTF API (``struct btf``).

tuplet reads the layout of its map keys and values and the names of its enums
(verdict reasons, ...) from the BTF of the compiled BPF objects, so the C headers
stay the only definition::

    with load_btf_from_elf("build/bpf_lxc.o") as btf:
        struct_layout(btf, "ct_entry").size         # 56
        numpy_dtype(btf, "ipv4_ct_tuple").itemsize  # 14
        btf.enum_values("tpl_reason")              # {"TPL_PASS_CT_NEW": 0, ...}

libbpf parses and checks the BTF: an ELF's ``.BTF`` section, a raw blob such as
/sys/kernel/btf/vmlinux, the kernel's copy of a map's BTF, or the BTF of an opened
``bpf_object``. A :class:`Btf` owns its ``struct btf`` (freed by ``close()``, or when
collected) or borrows it from a ``bpf_object`` (whose owner closes the Btf before the
object). Either way a use after ``close()`` raises :class:`BtfError`. Struct layouts
and numpy dtypes are in :mod:`tuplet.bpf.btf_layout`. Split BTF is not supported.
"""
from __future__ import annotations

import ctypes
import enum
import errno
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, TypeVar, Union

from tuplet.bpf import _libbpf as C
from tuplet.bpf.libbpf import check_ptr, clear_messages, cstr
from tuplet.core.errors import NotFoundError, TupletError

if TYPE_CHECKING:
    pass



class BtfError(TupletError):
    """BTF libbpf could not read, a Btf used after close, or a type not of the kind asked for."""


class BtfNotFoundError(BtfError, NotFoundError):
    """No BTF where it was looked for, or no type (or member) of the requested name."""


class Kind(enum.IntEnum):
    """BTF_KIND_*; VOID is type id 0."""
    VOID, INT, PTR, ARRAY, STRUCT = range(5)
    UNION, ENUM, FWD, TYPEDEF, VOLATILE = range(5, 10)
    CONST, RESTRICT, FUNC, FUNC_PROTO, VAR = range(10, 15)
    DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(15, 20)


MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_SIZED = frozenset({Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.FLOAT, Kind.DATASEC,
                    Kind.ENUM64})  # btf_type's union holds ``size``; for the others, ``type``
_U32 = ctypes.c_uint32


# The records following a struct btf_type (uapi linux/btf.h); the bindings have btf_type
# and btf_enum64 but not these.
class BtfArray(ctypes.Structure):
    _fields_ = [("type", _U32), ("index_type", _U32), ("nelems", _U32)]
    type: int
    index_type: int
    nelems: int


class BtfMember(ctypes.Structure):
    _fields_ = [("name_off", _U32), ("type", _U32), ("offset", _U32)]
    name_off: int
    type: int
    offset: int  # with the STRUCT's kind_flag: bitfield size << 24 | bit offset


class BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", _U32), ("val", ctypes.c_int32)]
    name_off: int
    val: int


class BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", _U32), ("offset", _U32), ("size", _U32)]
    type: int
    offset: int
    size: int


@dataclass(frozen=True)
class BtfType:
    """A copy of one type's ``struct btf_type`` (with an INT's encoding, an ARRAY's shape)."""
    id: int
    kind: Kind
    name: str
    size: int = 0          # INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC
    type: int = 0          # the type referred to; for an ARRAY, the element type
    vlen: int = 0          # number of members, enumerators, parameters or variables
    kflag: bool = False    # STRUCT/UNION: bitfield member offsets; ENUM: signed; FWD: union
    signed: bool = False   # an INT with the SIGNED encoding, or a signed ENUM/ENUM64
    bits: int = 0          # INT: bits used ...
    bit_offset: int = 0    # ... from this bit
    nelems: int = 0        # ARRAY


class Member(NamedTuple):
    name: str
    type: int
    bit_offset: int
    bitfield_size: int  # 0: not a bitfield (or, without kind_flag, see the INT type)


TypeRef = Union[str, int]
R = TypeVar("R", bound=ctypes.Structure)


class Btf:
    """A ``struct btf``: ``btf[i]`` is type id ``i`` (0 is void), ``len(btf)`` their count."""

    def __init__(self, ptr: Any, what: str, owned: bool = True) -> None:
        self._ptr: Any = ptr or None
        self.what = what
        self._owned = owned
        if self._ptr is None:
            raise BtfNotFoundError(what, "open", errno.ENOENT, "NULL struct btf")

    # --- Loading and lifetime. ---

    @classmethod
    def _libbpf(cls, what: str, op: str, fn: Callable[..., Any], *args: Any) -> Btf:
        clear_messages()
        ctypes.set_errno(0)
        ptr = fn(*args)
        try:
            check_ptr(ptr, what, op)
        except TupletError as e:
            kind = BtfNotFoundError if isinstance(e, NotFoundError) else BtfError
            raise kind(what, op, e.errno, e.detail) from None
        return cls(ptr, what)

    @classmethod
    def from_file(cls, path: str | Path) -> Btf:
        """Raw BTF (such as /sys/kernel/btf/vmlinux) or an ELF file's ``.BTF``."""
        return cls._libbpf(f"BTF of {path}", "parse", C.btf__parse, cstr(str(path)), None)

    @classmethod
    def from_bytes(cls, data: bytes) -> Btf:
        """A raw BTF blob (libbpf copies it)."""
        return cls._libbpf("BTF blob", "parse", C.btf__new, bytes(data), len(data))

    @classmethod
    def from_kernel(cls, btf_id: int, what: str = "") -> Btf:
        """The kernel's BTF object ``btf_id`` (a map's ``btf_id``)."""
        return cls._libbpf(what or f"BTF id {btf_id}", "load", C.btf__load_from_kernel_by_id, btf_id)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Free the ``struct btf`` if owned, forget it if borrowed; idempotent."""
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None and self._owned:
            C.btf__free(ptr)

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # --- Raw access: every read of libbpf's memory goes through _p(). ---

    def _p(self) -> Any:
        if self._ptr is None:
            raise BtfError(self.what, "read", detail="used after close")
        return self._ptr

    def _raw(self, type_id: int) -> Any:
        count = int(C.btf__type_cnt(self._p()))
        if not 0 <= type_id < count:
            raise BtfNotFoundError(self.what, f"type id {type_id}", detail=f"no such type (have {count - 1})")
        return C.btf__type_by_id(self._ptr, type_id).contents

    def _after(self, raw: Any) -> int:
        return ctypes.addressof(raw) + ctypes.sizeof(C.btf_type)

    def _records(self, t: BtfType, rec: type[R]) -> ctypes.Array[R]:
        """The ``vlen`` records after a type, in libbpf's memory: copy them out at once."""
        return (rec * t.vlen).from_address(self._after(self._raw(t.id)))

    def _name(self, off: int) -> str:
        name: bytes | None = C.btf__name_by_offset(self._p(), off)
        return (name or b"").decode("utf-8", "replace")

    def __len__(self) -> int:
        return int(C.btf__type_cnt(self._p()))

    def __getitem__(self, type_id: int) -> BtfType:
        raw = self._raw(type_id)
        info = int(raw.info)
        try:
            kind = Kind(info >> 24 & 0x1F)
        except ValueError:
            raise BtfError(self.what, f"type id {type_id}", detail=f"unknown kind {info >> 24 & 0x1F}") from None
        sized, kflag = kind in _SIZED, bool(info >> 31)
        t = BtfType(type_id, kind, self._name(raw.name_off) if type_id else "void",
                    raw.size if sized else 0, 0 if sized else raw.type, info & 0xFFFF, kflag,
                    signed=kflag and kind in (Kind.ENUM, Kind.ENUM64))
        if kind == Kind.INT:  # encoding (SIGNED 1, CHAR 2, BOOL 4) << 24 | offset << 16 | bits
            enc = _U32.from_address(self._after(raw)).value
            return replace(t, signed=bool(enc >> 24 & 1), bit_offset=enc >> 16 & 0xFF, bits=enc & 0xFF)
        if kind == Kind.ARRAY:
            arr = BtfArray.from_address(self._after(raw))
            return replace(t, type=arr.type, nelems=arr.nelems)
        return t

    # --- Lookup. ---

    def find(self, name: str, kind: Kind | str | None = None) -> BtfType:
        """The first type called ``name`` ("struct foo" also works), never a FWD unless asked."""
        prefix, _, rest = name.partition(" ")
        if rest and kind is None and prefix in ("struct", "union", "enum"):
            name, kind = rest, prefix
        if isinstance(kind, str):
            try:
                kind = Kind[kind.upper()]
            except KeyError:
                raise BtfError(self.what, f"find {name}", detail=f"unknown kind {kind!r}") from None
        if kind is None:
            tid = int(C.btf__find_by_name(self._p(), name.encode()))
            if tid > 0 and self[tid].kind == Kind.FWD:  # a declaration: find the definition
                tid = self._find_kind(name, (Kind.STRUCT, Kind.UNION))
        else:
            tid = self._find_kind(name, (kind, Kind.ENUM64) if kind == Kind.ENUM else (kind,))
        if tid <= 0:
            what = f"{kind.name.lower()} {name}" if kind is not None else name
            raise BtfNotFoundError(self.what, f"find {what}", detail="no such type")
        return self[tid]

    def _find_kind(self, name: str, kinds: tuple[Kind, ...]) -> int:
        for kind in kinds:
            tid = int(C.btf__find_by_name_kind(self._p(), name.encode(), kind))
            if tid > 0:
                return tid
        return -errno.ENOENT

    def _get(self, ref: TypeRef) -> BtfType:
        return self[ref] if isinstance(ref, int) else self.find(ref)

    def resolve(self, ref: TypeRef) -> BtfType:
        """The type behind typedefs and const/volatile/restrict/type_tag modifiers."""
        t = self._get(ref)
        if t.kind not in MODIFIERS:
            return t
        tid = int(C.btf__resolve_type(self._p(), t.id))
        if tid < 0:
            raise BtfError(self.what, f"resolve {self.type_name(t.id)}", -tid)
        return self[tid]

    def sizeof(self, ref: TypeRef) -> int:
        t = self._get(ref)
        size = int(C.btf__resolve_size(self._p(), t.id))
        if size < 0:
            raise BtfError(self.what, f"size of {self.type_name(t.id)}", -size, "type has no size")
        return size

    def type_name(self, ref: TypeRef) -> str:
        """A C-like spelling: "__u32", "struct foo", "char *", "__u8[6]"."""
        t = self._get(ref)
        if t.kind == Kind.ARRAY:
            dims = ""
            while t.kind == Kind.ARRAY:
                dims += f"[{t.nelems}]"
                t = self[t.type]
            return self.type_name(t.id) + dims
        if t.kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FWD):
            union = t.kind == Kind.UNION or (t.kind == Kind.FWD and t.kflag)
            tag = "enum" if t.kind in (Kind.ENUM, Kind.ENUM64) else "union" if union else "struct"
            return f"{tag} {t.name or '(anon)'}"
        if t.kind in (Kind.PTR, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG):
            inner = self.type_name(t.type)
            if t.kind == Kind.PTR:
                return inner + " *"
            return inner if t.kind == Kind.TYPE_TAG else f"{t.kind.name.lower()} {inner}"
        return t.name or f"({t.kind.name.lower()})"

    def _not_a(self, t: BtfType, wanted: str) -> BtfError:
        return BtfError(self.what, detail=f"{self.type_name(t.id)} is a {t.kind.name}, not {wanted}")

    def composite(self, ref: TypeRef) -> BtfType:
        """The STRUCT or UNION ``ref`` is (after typedefs and modifiers)."""
        t = self.resolve(ref)
        if t.kind not in (Kind.STRUCT, Kind.UNION):
            raise self._not_a(t, "a struct or union")
        return t

    def members(self, ref: TypeRef) -> list[Member]:
        """The members of a struct or union, anonymous ones not flattened."""
        t = self.composite(ref)
        return [Member(self._name(m.name_off), m.type, m.offset & 0xFFFFFF if t.kflag else m.offset,
                       m.offset >> 24 if t.kflag else 0) for m in self._records(t, BtfMember)]

    def enum_values(self, ref: TypeRef) -> dict[str, int]:
        """Enumerator names to values of an ENUM or ENUM64 (or a typedef of one)."""
        t = self.resolve(ref)
        if t.kind == Kind.ENUM:
            return {self._name(e.name_off): e.val if t.signed else e.val & 0xFFFFFFFF
                    for e in self._records(t, BtfEnum)}
        if t.kind == Kind.ENUM64:
            values = {self._name(e.name_off): e.val_hi32 << 32 | e.val_lo32
                      for e in self._records(t, C.btf_enum64)}
            return {k: v - (v >> 63 << 64) if t.signed else v for k, v in values.items()}
        raise self._not_a(t, "an enum")

    def datasec_vars(self, ref: TypeRef) -> list[tuple[int, int, int]]:
        """(VAR type id, offset, size) of each variable of a DATASEC (``.rodata``, ``.bss``)."""
        t = self._get(ref)
        if t.kind != Kind.DATASEC:
            raise self._not_a(t, "a DATASEC")
        return [(v.type, v.offset, v.size) for v in self._records(t, BtfVarSecinfo)]


def load_btf_from_elf(path: str | Path) -> Btf:
    """The ``.BTF`` section of an ELF object file (a compiled BPF object)."""
    return Btf._libbpf(f"BTF of {path}", "parse", C.btf__parse_elf, cstr(str(path)), None)
