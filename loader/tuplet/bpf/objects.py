"""BPF objects: an editable spec (open, configure) that loads into a collection.

    spec = ObjectSpec.open("build/bpf_lxc.o", pin_root="/sys/fs/bpf/tuplet")
    spec.set_max_entries("tpl_ct4_v1", 1 << 20)
    spec.set_const("ct_syn_timeout", 30)
    with spec.load() as coll:          # verifier rejection -> VerifierError with the log
        prog = coll.programs["cil_from_container"]

Maps declared with ``LIBBPF_PIN_BY_NAME`` are pinned as ``<pin_root>/<map name>``; a
pin that exists is reused when compatible (state survives a reload) and refused
with :class:`IncompatiblePinError` otherwise.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from tuplet.bpf import _libbpf as C
from tuplet.bpf.btf import Btf, BtfNotFoundError, Kind
from tuplet.bpf.fd import Lifetime
from tuplet.bpf.libbpf import check, check_ptr, clear_messages, cstr, opts, recent_messages
from tuplet.bpf.maps import Map
from tuplet.bpf.programs import Program
from tuplet.core.errors import IncompatiblePinError, NotFoundError, TupletError, VerifierError

log = structlog.get_logger("tuplet.objects")

VERIFIER_LOG_SIZE = 8 << 20


@dataclass(frozen=True)
class MapSpec:
    """A map as the object declares it (after any changes made on the spec)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    pin_path: str | None


@dataclass(frozen=True)
class GlobalVar:
    """A global variable's place in its data section."""

    name: str
    offset: int
    size: int
    signed: bool


def datasec_var(btf: Btf, section: str, name: str) -> GlobalVar:
    """Find a global variable of a data section (``.rodata``, ``.bss``) in BTF."""
    try:
        sec = btf.find(section, Kind.DATASEC)
    except BtfNotFoundError:
        raise NotFoundError(f"section {section}", "find", errno.ENOENT, "the object has no such section") from None
    found = [(btf[type_id], offset, size) for type_id, offset, size in btf.datasec_vars(sec.id)]
    for var, offset, size in found:
        if var.kind == Kind.VAR and var.name == name:
            return GlobalVar(name, offset, size, btf.resolve(var.type).signed)
    known = sorted(var.name for var, _, _ in found)
    raise NotFoundError(f"{section} variable {name}", "find", errno.ENOENT, f"known: {', '.join(known)}")


class ObjectSpec:
    """An opened, not yet loaded BPF object."""

    def __init__(self, obj: ctypes.c_void_p, path: str, pin_root: str | None) -> None:
        self._obj: ctypes.c_void_p | None = obj
        self.path = path
        self.pin_root = pin_root
        self._btf: Btf | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], pin_root: str | None = None) -> "ObjectSpec":
        p = str(path)
        if not os.path.exists(p):
            raise NotFoundError(f"object {p}", "open", errno.ENOENT,
                                "build it with `make` (the BPF objects are not committed)")
        o = opts(C.bpf_object_open_opts)
        # Always give libbpf a pin root: without one it pins by-name maps in /sys/fs/bpf.
        root = cstr(pin_root or "/sys/fs/bpf/tuplet")
        o.pin_root_path = root
        clear_messages()
        ctypes.set_errno(0)
        obj = C.bpf_object__open_file(cstr(p), ctypes.byref(o))
        check_ptr(obj, f"object {p}", "open")
        spec = cls(obj, p, pin_root)
        if pin_root is None:
            for m in spec._maps():
                C.bpf_map__set_pin_path(m, None)
        return spec

    # --- inspection --------------------------------------------------------------------------

    def _handle(self) -> ctypes.c_void_p:
        """The libbpf object; a closed (or loaded) spec raises instead of touching freed memory."""
        if self._obj is None:
            raise TupletError(f"object {self.path}", "use", errno.EBADF, "the spec is closed (or was loaded)")
        return self._obj

    def _maps(self) -> list[ctypes.c_void_p]:
        out = []
        m = C.bpf_object__next_map(self._handle(), None)
        while m:
            out.append(m)
            m = C.bpf_object__next_map(self._handle(), m)
        return out

    def _map(self, name: str) -> ctypes.c_void_p:
        m: ctypes.c_void_p | None = C.bpf_object__find_map_by_name(self._handle(), cstr(name))
        if not m:
            raise NotFoundError(f"object {self.path}", f"find map {name}", errno.ENOENT)
        return m

    def map_spec(self, m: ctypes.c_void_p) -> MapSpec:
        pin = C.bpf_map__pin_path(m)
        return MapSpec(
            name=C.bpf_map__name(m).decode(),
            type=C.bpf_map__type(m),
            key_size=C.bpf_map__key_size(m),
            value_size=C.bpf_map__value_size(m),
            max_entries=C.bpf_map__max_entries(m),
            flags=C.bpf_map__map_flags(m),
            pin_path=pin.decode() if pin else None,
        )

    @property
    def maps(self) -> dict[str, MapSpec]:
        return {s.name: s for s in (self.map_spec(m) for m in self._maps())}

    @property
    def program_names(self) -> list[str]:
        names = []
        p = C.bpf_object__next_program(self._handle(), None)
        while p:
            names.append(C.bpf_program__name(p).decode())
            p = C.bpf_object__next_program(self._handle(), p)
        return names

    @property
    def btf(self) -> Btf:
        """The object's BTF as libbpf fixed it up at open (data sections sized), owned by the
        object: closed with the spec, or with the collection it loads into."""
        if self._btf is None:
            if self._obj is None:
                raise TupletError(f"object {self.path}", "get BTF", detail="already loaded or closed")
            b = C.bpf_object__btf(self._obj)
            if not b:
                raise BtfNotFoundError(f"object {self.path}", "get BTF", errno.ENOENT, "no .BTF (build with -g)")
            self._btf = Btf(b, f"BTF of object {self.path}", owned=False)
        return self._btf

    # --- configuration before load -----------------------------------------------------------

    def set_max_entries(self, name: str, n: int) -> None:
        if n <= 0:
            raise TupletError(f"map {name}", "set size", detail=f"size must be positive, got {n}")
        check(C.bpf_map__set_max_entries(self._map(name), n), f"map {name}", "set size")

    def reuse_map(self, name: str, m: Map) -> None:
        """Make the object use an existing map (by fd) instead of creating or pinning one.

        The map's pin path is cleared: libbpf would otherwise open the pin (and refuse a
        pinned map of another size) or pin the given map there.
        """
        mp = self._map(name)
        check(C.bpf_map__reuse_fd(mp, m.fd), f"map {name}", "reuse existing map")
        check(C.bpf_map__set_pin_path(mp, None), f"map {name}", "clear pin path")

    def set_const(self, name: str, value: int) -> None:
        """Set a ``const volatile`` global (in .rodata) before load."""
        self._set_global(".rodata", name, value)

    def set_initial(self, section: str, name: str, value: int) -> None:
        """Set the initial value of a writable global (``.bss``/``.data``) before load."""
        self._set_global(section, name, value)

    def has_global(self, section: str, name: str) -> bool:
        try:
            datasec_var(self.btf, section, name)
        except NotFoundError:
            return False
        return True

    def _set_global(self, section: str, name: str, value: int) -> None:
        var = datasec_var(self.btf, section, name)
        m = self._section_map(section)
        size = ctypes.c_size_t()
        data = check_ptr(C.bpf_map__initial_value(m, ctypes.byref(size)), f"map {section}", "initial value")
        if var.offset + var.size > size.value:
            raise TupletError(f"{section} {name}", "set", detail="variable lies outside the section")
        try:
            raw = int(value).to_bytes(var.size, "little", signed=var.signed)
        except OverflowError:
            raise TupletError(f"{section} {name}", "set",
                              detail=f"{value} does not fit in {var.size} byte(s)") from None
        ctypes.memmove(_address(data) + var.offset, raw, var.size)

    def get_const(self, name: str) -> int:
        var = datasec_var(self.btf, ".rodata", name)
        size = ctypes.c_size_t()
        data = check_ptr(C.bpf_map__initial_value(self._section_map(".rodata"), ctypes.byref(size)),
                         "map .rodata", "initial value")
        raw = ctypes.string_at(_address(data) + var.offset, var.size)
        return int.from_bytes(raw, "little", signed=var.signed)

    def _section_map(self, section: str) -> ctypes.c_void_p:
        for m in self._maps():
            if C.bpf_map__is_internal(m) and C.bpf_map__name(m).decode().endswith(section):
                return m
        raise NotFoundError(f"object {self.path}", f"find section {section}", errno.ENOENT)

    # --- pins --------------------------------------------------------------------------------

    def check_pins(self) -> list[str]:
        """Compare every existing pin with the map the object will create.

        Returns the pins that will be reused; raises IncompatiblePinError when one differs.
        """
        reused = []
        for ms in self.maps.values():
            if not ms.pin_path or not os.path.exists(ms.pin_path):
                continue
            with Map.from_pin(ms.pin_path) as pinned:
                diffs = pin_differences(ms, pinned)
            if diffs:
                raise IncompatiblePinError(ms.pin_path, diffs)
            reused.append(ms.pin_path)
        return reused

    # --- load --------------------------------------------------------------------------------

    def load(self) -> "Collection":
        """Load into the kernel (reusing or creating pins). The spec is consumed."""
        if self._obj is None:
            raise TupletError(f"object {self.path}", "load", detail="already loaded or closed")
        if self.pin_root:
            Path(self.pin_root).mkdir(parents=True, exist_ok=True)
        reused = self.check_pins()
        logs: dict[str, ctypes.Array[ctypes.c_char]] = {}
        p = C.bpf_object__next_program(self._handle(), None)
        while p:
            buf = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
            logs[C.bpf_program__name(p).decode()] = buf
            check(C.bpf_program__set_log_buf(p, buf, VERIFIER_LOG_SIZE), f"object {self.path}", "set log buffer")
            p = C.bpf_object__next_program(self._handle(), p)
        clear_messages()
        ctypes.set_errno(0)
        ret = C.bpf_object__load(self._handle())
        if ret < 0:
            err = -ret if ret > -4096 else ctypes.get_errno()
            failed = [(name, buf.value.decode(errors="replace")) for name, buf in logs.items() if buf.value]
            said = recent_messages()
            self.close()
            if failed:
                name, text = failed[-1]
                raise VerifierError(name, err, text)
            raise TupletError(f"object {self.path}", "load", err, said)
        btf = self.btf
        obj, self._obj = self._obj, None
        coll = Collection(obj, self.path, btf)
        coll.reused_pins = reused
        log.info("object loaded", object=os.path.basename(self.path), programs=list(coll.programs),
                 reused_pins=[os.path.basename(r) for r in reused])
        return coll

    def close(self) -> None:
        if self._obj is not None:
            obj, self._obj = self._obj, None
            if self._btf is not None:
                self._btf.close()
            C.bpf_object__close(obj)

    def __enter__(self) -> "ObjectSpec":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(ptr: ctypes.c_void_p | int) -> int:
    """A non-NULL pointer's address."""
    addr = ctypes.cast(ptr, ctypes.c_void_p).value
    if not addr:
        raise TupletError("pointer", "use", errno.EFAULT, "NULL")
    return addr


def pin_differences(spec: MapSpec, pinned: Map) -> list[str]:
    """What differs between a map spec and a pinned map (empty: compatible)."""
    info = pinned.info
    diffs = []
    for field, want, have in (("type", spec.type, info.type), ("key size", spec.key_size, info.key_size),
                              ("value size", spec.value_size, info.value_size),
                              ("max entries", spec.max_entries, info.max_entries),
                              ("flags", spec.flags, info.flags)):
        if want != have:
            diffs.append(f"{field}: pinned {have}, wanted {want}")
    return diffs


class Collection:
    """A loaded object: its maps and programs. Closing it releases fds, not pins."""

    def __init__(self, obj: ctypes.c_void_p, path: str, btf: Btf) -> None:
        self._obj: ctypes.c_void_p | None = obj
        self.path = path
        self.btf = btf
        self.reused_pins: list[str] = []
        self.maps: dict[str, Map] = {}
        self.programs: dict[str, Program] = {}
        self._lifetime = Lifetime(f"object {path}")
        m = C.bpf_object__next_map(obj, None)
        while m:
            name = C.bpf_map__name(m).decode()
            self.maps[name] = Map(C.bpf_map__fd(m), name, self._lifetime)
            m = C.bpf_object__next_map(obj, m)
        p = C.bpf_object__next_program(obj, None)
        while p:
            name = C.bpf_program__name(p).decode()
            self.programs[name] = Program(C.bpf_program__fd(p), name, self._lifetime)
            p = C.bpf_object__next_program(obj, p)

    def section_map(self, section: str) -> Map:
        """The internal map of a data section (``.bss``, ``.data``, ``.rodata``)."""
        for name, m in self.maps.items():
            if name.endswith(section):
                return m
        raise NotFoundError(f"object {self.path}", f"find section {section}", errno.ENOENT)

    def set_global(self, section: str, name: str, value: int) -> None:
        """Write a global of a writable data section (``.bss``/``.data``) of the loaded object."""
        var = datasec_var(self.btf, section, name)
        m = self.section_map(section)
        raw = bytearray(m.lookup(0) or b"")
        raw[var.offset:var.offset + var.size] = int(value).to_bytes(var.size, "little", signed=var.signed)
        m.update(0, bytes(raw))

    def get_global(self, section: str, name: str) -> int:
        var = datasec_var(self.btf, section, name)
        raw = self.section_map(section).lookup(0) or b""
        return int.from_bytes(raw[var.offset:var.offset + var.size], "little", signed=var.signed)

    def close(self) -> None:
        if self._obj is not None:
            obj, self._obj = self._obj, None
            self._lifetime.end()   # maps and programs handed out refuse to be used from now on
            self.btf.close()
            C.bpf_object__close(obj)

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
