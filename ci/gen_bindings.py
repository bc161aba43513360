#!/usr/bin/env python3
"""Generate ctypes bindings for the system libbpf.

Parses <bpf/libbpf.h>, <bpf/bpf.h> and <bpf/btf.h> with libclang and writes
``loader/tuplet/bpf/_libbpf.py``: enum constants, integer macros, one ctypes
Structure/Union per reachable C record, callback typedefs and the
restype/argtypes of every ``LIBBPF_API`` function exported by libbpf.so.1.

The output is deterministic (header declaration order, no paths or
timestamps) so tests can detect drift.  Before writing, the generated module
is executed and every record's size, alignment and field offsets are checked
against clang's layout.

Usage: python ci/gen_bindings.py [--output PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import keyword
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import clang.cindex as ci

TK = ci.TypeKind
CK = ci.CursorKind

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "loader" / "tuplet" / "bpf" / "_libbpf.py"
SONAME = "libbpf.so.1"
SYS_INCLUDE = Path("/usr/include")
LIBBPF_DIR = str(SYS_INCLUDE / "bpf") + "/"
TU_SOURCE = "#include <bpf/libbpf.h>\n#include <bpf/bpf.h>\n#include <bpf/btf.h>\n"
# BPF-side header (clashes with libbpf.h) parsed separately for its enums only,
# e.g. enum libbpf_pin_type (LIBBPF_PIN_BY_NAME).
HELPERS_SOURCE = "#include <linux/types.h>\n#include <bpf/bpf_helpers.h>\n"
HELPERS_HEADER = str(SYS_INCLUDE / "bpf" / "bpf_helpers.h")
# uapi headers whose enum constants and integer macros are exported as well.
UAPI_HEADERS = tuple(str(SYS_INCLUDE / "linux" / h) for h in ("bpf.h", "bpf_common.h", "btf.h"))
# uapi records that libbpf users need although 1.1 passes them as void *.
EXTRA_RECORDS = ("bpf_insn", "bpf_prog_info", "bpf_map_info", "bpf_link_info", "bpf_btf_info")

PRIMITIVES = {
    TK.BOOL: "ctypes.c_bool", TK.CHAR_S: "ctypes.c_char", TK.CHAR_U: "ctypes.c_char",
    TK.SCHAR: "ctypes.c_byte", TK.UCHAR: "ctypes.c_ubyte", TK.SHORT: "ctypes.c_short",
    TK.USHORT: "ctypes.c_ushort", TK.INT: "ctypes.c_int", TK.UINT: "ctypes.c_uint",
    TK.LONG: "ctypes.c_long", TK.ULONG: "ctypes.c_ulong", TK.LONGLONG: "ctypes.c_longlong",
    TK.ULONGLONG: "ctypes.c_ulonglong", TK.FLOAT: "ctypes.c_float",
    TK.DOUBLE: "ctypes.c_double", TK.LONGDOUBLE: "ctypes.c_longdouble",
}
# Well-known integer typedefs, mapped to readable fixed-width ctypes names.
TYPEDEF_NAMES = {
    **{f"__{s}{n}": f"ctypes.c_{'u' if s == 'u' else ''}int{n}" for s in "us" for n in (8, 16, 32, 64)},
    **{f"{p}int{n}_t": f"ctypes.c_{p}int{n}" for p in ("", "u") for n in (8, 16, 32, 64)},
    "size_t": "ctypes.c_size_t", "ssize_t": "ctypes.c_ssize_t",
}
VA_LIST_NAMES = {"va_list", "__gnuc_va_list", "__builtin_va_list"}
# Type contexts: a struct field, a function argument, a return value.
FIELD, ARG, RET = "field", "arg", "ret"
MACRO_PUNCT = {"(", ")", "<<", ">>", "|", "&", "+", "-", "*", "^"}
INT_LITERAL = re.compile(r"^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)[uUlL]*$")


class GenerationError(RuntimeError):
    """Raised when the headers cannot be mapped faithfully onto ctypes."""


@dataclass
class Field:
    """One ctypes ``_fields_`` entry plus clang's bit offset for the self-check."""

    name: str
    ctype: str
    bits: Optional[int]
    bit_offset: int


@dataclass
class Record:
    """A C struct/union to be emitted as a ctypes class."""

    name: str
    prefix: str  # used to name helper classes of nested unnamed records
    decl: ci.Cursor
    definition: Optional[ci.Cursor]
    fields: list[Field] = field(default_factory=list)
    anonymous: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)  # records embedded by value

    @property
    def base(self) -> str:
        return "ctypes.Union" if self.decl.kind == CK.UNION_DECL else "ctypes.Structure"

    @property
    def packed(self) -> bool:
        return self.definition is not None and any(
            c.kind == CK.PACKED_ATTR for c in self.definition.get_children())


@dataclass
class Function:
    name: str
    restype: str
    argtypes: list[str]
    variadic: bool


def _fmt_int(value: int) -> str:
    return str(value) if -256 < value < 256 else hex(value)


def _file_of(cursor: ci.Cursor) -> str:
    return cursor.location.file.name if cursor.location.file else ""


def _decl_key(decl: ci.Cursor) -> str:
    """Stable identity of a record/enum declaration (location for unnamed ones)."""
    if decl.is_anonymous():
        return f"@{_file_of(decl)}:{decl.location.offset}"
    return f"{decl.kind.name}:{decl.spelling}"


def _strip_sugar(t: ci.Type) -> ci.Type:
    """Drop ELABORATED wrappers (``struct foo`` -> the record type)."""
    while t.kind == TK.ELABORATED:
        t = t.get_named_type()
    return t


def resource_include_dir() -> list[str]:
    """Compiler builtin headers (stddef.h, stdarg.h) from the system clang."""
    try:
        out = subprocess.run(["clang", "-print-resource-dir"], check=True,
                             capture_output=True, text=True).stdout.strip()
        return ["-isystem", f"{out}/include"]
    except (OSError, subprocess.CalledProcessError):
        found = sorted(glob.glob("/usr/lib/llvm-*/lib/clang/*/include"))
        return ["-isystem", found[-1]] if found else []


def parse_headers(source: str = TU_SOURCE) -> ci.TranslationUnit:
    """Parse a tiny translation unit (by default: the three libbpf headers)."""
    args = [*resource_include_dir(), "-I/usr/include/x86_64-linux-gnu"]
    tu = ci.Index.create().parse(
        "libbpf_tu.c", args=args, unsaved_files=[("libbpf_tu.c", source)],
        options=ci.TranslationUnit.PARSE_DETAILED_PROCESSING_RECORD)
    errors = [str(d) for d in tu.diagnostics if d.severity >= ci.Diagnostic.Error]
    if errors:
        raise GenerationError("clang failed to parse the libbpf headers:\n" + "\n".join(errors))
    return tu


def libbpf_version() -> str:
    text = (SYS_INCLUDE / "bpf" / "libbpf_version.h").read_text()
    major = re.search(r"#define\s+LIBBPF_MAJOR_VERSION\s+(\d+)", text)
    minor = re.search(r"#define\s+LIBBPF_MINOR_VERSION\s+(\d+)", text)
    if not (major and minor):
        raise GenerationError("cannot read the version from bpf/libbpf_version.h")
    return f"{major.group(1)}.{minor.group(1)}"


class Generator:
    """Collects declarations from the translation unit and renders the module."""

    def __init__(self, tu: ci.TranslationUnit, helpers_tu: ci.TranslationUnit) -> None:
        self.tu = tu
        self.helper_enums = [c for c in helpers_tu.cursor.get_children()
                             if c.kind == CK.ENUM_DECL and _file_of(c) == HELPERS_HEADER
                             and not c.is_anonymous()]
        self.top = list(tu.cursor.get_children())
        self.position: dict[str, int] = {}
        for i, c in enumerate(self._tag_decls(self.top)):
            self.position.setdefault(_decl_key(c), i)
        self.records: dict[str, Record] = {}
        self.pending: list[Record] = []
        self.enums: dict[str, ci.Cursor] = {}
        self.typedefs = {c.spelling: c for c in self.top
                         if c.kind == CK.TYPEDEF_DECL and _file_of(c).startswith(LIBBPF_DIR)}
        self.lib = ctypes.CDLL(SONAME)

    def _tag_decls(self, cursors: list[ci.Cursor]) -> Iterator[ci.Cursor]:
        """Record/enum declarations in header order, including nested ones."""
        for c in cursors:
            if c.kind in (CK.STRUCT_DECL, CK.UNION_DECL, CK.ENUM_DECL):
                yield c
                if c.kind != CK.ENUM_DECL:
                    yield from self._tag_decls(list(c.get_children()))

    # -- type expressions ---------------------------------------------------

    def type_expr(self, t: ci.Type, ctx: str) -> str:
        """ctypes expression for clang type ``t``; registers records/enums it uses."""
        t = _strip_sugar(t)
        k = t.kind
        if k == TK.TYPEDEF:
            name = t.get_declaration().spelling
            if name in VA_LIST_NAMES:
                return "ctypes.c_void_p"
            if name in TYPEDEF_NAMES:
                return TYPEDEF_NAMES[name]
            if name in self.typedefs:
                return name
            return self.type_expr(t.get_declaration().underlying_typedef_type, ctx)
        if k == TK.POINTER:
            return self.pointer_expr(t.get_pointee(), ctx)
        if k in (TK.CONSTANTARRAY, TK.INCOMPLETEARRAY):
            elem = self.type_expr(t.element_type, FIELD)
            if ctx == ARG:
                return f"ctypes.POINTER({elem})"
            return f"({elem} * {t.element_count if k == TK.CONSTANTARRAY else 0})"
        if k == TK.RECORD:
            return self.require_record(t.get_declaration()).name
        if k == TK.ENUM:
            return self.require_enum(t.get_declaration())
        if k == TK.FUNCTIONPROTO:
            return self.cfunctype(t)
        if k == TK.VOID:
            return "None"
        if k in PRIMITIVES:
            return PRIMITIVES[k]
        raise GenerationError(f"unsupported C type {t.spelling!r} ({k})")

    def pointer_expr(self, pointee: ci.Type, ctx: str) -> str:
        """ctypes expression for a pointer to ``pointee``."""
        canon = pointee.get_canonical()
        if canon.kind == TK.VOID or canon.get_declaration().spelling == "__va_list_tag":
            return "ctypes.c_void_p"  # va_list arguments decay to __va_list_tag *
        if canon.kind in (TK.CHAR_S, TK.CHAR_U):
            # const char * (and returned strings) become bytes; writable
            # buffers stay POINTER(c_char) so create_string_buffer() fits.
            if canon.is_const_qualified() or ctx == RET:
                return "ctypes.c_char_p"
            return "ctypes.POINTER(ctypes.c_char)"
        if canon.kind == TK.FUNCTIONPROTO:
            sugar = _strip_sugar(pointee)
            while sugar.kind == TK.TYPEDEF:  # typedef'd function type (not pointer)
                if sugar.get_declaration().spelling in self.typedefs:
                    return sugar.get_declaration().spelling
                sugar = _strip_sugar(sugar.get_declaration().underlying_typedef_type)
            # keep the sugared prototype so __u32/size_t arguments stay readable
            return self.cfunctype(sugar if sugar.kind == TK.FUNCTIONPROTO else canon)
        if canon.kind == TK.FUNCTIONNOPROTO:
            raise GenerationError(f"K&R function pointer {pointee.spelling!r} not supported")
        return f"ctypes.POINTER({self.type_expr(pointee, FIELD)})"

    def cfunctype(self, proto: ci.Type) -> str:
        if proto.is_function_variadic():
            raise GenerationError(f"variadic callback {proto.spelling!r} not supported")
        parts = [self.type_expr(proto.get_result(), RET)]
        parts += [self.type_expr(a, ARG) for a in proto.argument_types()]
        return f"ctypes.CFUNCTYPE({', '.join(parts)})"

    # -- records and enums --------------------------------------------------

    def require_record(self, decl: ci.Cursor, name: str = "", prefix: str = "") -> Record:
        """Register a record (once) and queue its fields for processing."""
        key = _decl_key(decl)
        if key in self.records:
            return self.records[key]
        if not name:
            if decl.is_anonymous() or not decl.spelling.isidentifier():
                raise GenerationError(f"unnamed record reached outside its parent: {key}")
            name = decl.spelling
        rec = Record(name, prefix or name, decl, decl.get_definition())
        self.records[key] = rec
        self.pending.append(rec)
        return rec

    def require_enum(self, decl: ci.Cursor) -> str:
        self.enums.setdefault(_decl_key(decl), decl)
        if decl.is_anonymous():
            return PRIMITIVES[decl.enum_type.get_canonical().kind]
        return decl.spelling

    @staticmethod
    def _unnamed_record(t: ci.Type) -> Optional[ci.Cursor]:
        """Declaration of an unnamed struct/union used (maybe as array) by ``t``."""
        t = _strip_sugar(t)
        while t.kind in (TK.CONSTANTARRAY, TK.INCOMPLETEARRAY):
            t = _strip_sugar(t.element_type)
        decl = t.get_declaration()
        if t.kind == TK.RECORD and decl.is_anonymous():
            return decl
        return None

    def _by_value_record(self, t: ci.Type) -> Optional[str]:
        t = _strip_sugar(t.get_canonical())
        while t.kind in (TK.CONSTANTARRAY, TK.INCOMPLETEARRAY):
            t = t.element_type.get_canonical()
        if t.kind == TK.RECORD:
            return _decl_key(t.get_declaration())
        return None

    def process_record(self, rec: Record) -> None:
        """Translate the fields of ``rec`` (no-op for opaque records)."""
        if rec.definition is None:
            return
        n_anon = n_pad = 0
        for f in rec.definition.type.get_fields():
            named = f.spelling.isidentifier()
            if f.is_bitfield():
                width = f.get_bitfield_width()
                if width == 0:
                    continue  # ctypes cannot express ':0'; the self-check guards the layout
                fname = f.spelling if named else f"_pad{n_pad}"
                n_pad += not named
                rec.fields.append(Field(fname, self.type_expr(f.type, FIELD), width,
                                        f.get_field_offsetof()))
                continue
            fname = f.spelling
            unnamed = self._unnamed_record(f.type)
            if unnamed is not None and named:
                helper = f"{rec.prefix}_{f.spelling}"
                self.require_record(unnamed, helper, helper)
            elif unnamed is not None:
                fname = f"_anon{n_anon}"
                self.require_record(unnamed, f"{rec.name}_anon{n_anon}", rec.prefix)
                rec.anonymous.append(fname)
                n_anon += 1
            elif not named:
                raise GenerationError(f"unnamed non-record field in {rec.name}")
            dep = self._by_value_record(f.type)
            if dep is not None:
                rec.deps.append(dep)
            rec.fields.append(Field(fname, self.type_expr(f.type, FIELD), None,
                                    f.get_field_offsetof()))

    def drain(self) -> None:
        while self.pending:
            self.process_record(self.pending.pop(0))

    # -- collection -----------------------------------------------------------

    def collect_functions(self) -> tuple[list[Function], list[str], list[str]]:
        """LIBBPF_API functions: (bound, declared but not exported, static inline)."""
        bound: list[Function] = []
        missing: list[str] = []
        inline: list[str] = []
        seen: set[str] = set()
        for c in self.top:
            if c.kind != CK.FUNCTION_DECL or not _file_of(c).startswith(LIBBPF_DIR):
                continue
            if c.spelling in seen:
                continue
            seen.add(c.spelling)
            if not any(ch.kind == CK.VISIBILITY_ATTR for ch in c.get_children()):
                if c.is_definition():
                    inline.append(c.spelling)
                continue
            if not hasattr(self.lib, c.spelling):
                missing.append(c.spelling)
                continue
            restype = self.type_expr(c.result_type, RET)
            argtypes = [self.type_expr(a.type, ARG) for a in c.get_arguments()]
            bound.append(Function(c.spelling, restype, argtypes,
                                  c.type.kind == TK.FUNCTIONPROTO and c.type.is_function_variadic()))
        return bound, missing, inline

    def collect_roots(self) -> None:
        """Records/enums declared in the libbpf headers plus EXTRA_RECORDS."""
        for c in self.top:
            path = _file_of(c)
            if c.kind in (CK.STRUCT_DECL, CK.UNION_DECL):
                if (path.startswith(LIBBPF_DIR) and not c.is_anonymous()) or \
                        (c.spelling in EXTRA_RECORDS and c.is_definition()):
                    self.require_record(c)
            elif c.kind == CK.ENUM_DECL and (path.startswith(LIBBPF_DIR) or path in UAPI_HEADERS):
                self.require_enum(c)

    def collect_macros(self, taken: set[str]) -> list[tuple[str, int]]:
        """Object-like #defines whose body is a constant integer expression."""
        known: dict[str, int] = {}
        for decl in self.enums.values():
            known.update((e.spelling, e.enum_value) for e in decl.get_children())
        out: list[tuple[str, int]] = []
        for c in self.top:
            path = _file_of(c)
            if c.kind != CK.MACRO_DEFINITION or c.spelling.startswith("_") or \
                    not (path.startswith(LIBBPF_DIR) or path in UAPI_HEADERS):
                continue
            tokens = list(c.get_tokens())
            if len(tokens) > 1 and tokens[1].spelling == "(" and \
                    tokens[1].extent.start.offset == tokens[0].extent.end.offset:
                continue  # function-like macro
            value = self._eval_macro([t.spelling for t in tokens[1:]], known)
            if value is None or c.spelling in taken or c.spelling in known:
                continue
            known[c.spelling] = value
            out.append((c.spelling, value))
        return out

    @staticmethod
    def _eval_macro(tokens: list[str], known: dict[str, int]) -> Optional[int]:
        if not tokens:
            return None
        expr = []
        for tok in tokens:
            m = INT_LITERAL.match(tok)
            if m:
                lit = m.group(1)
                expr.append(str(int(lit, 8) if lit.startswith("0") and lit[1:].isdigit() else int(lit, 0)))
            elif tok in MACRO_PUNCT or tok in known:
                expr.append(tok)
            else:
                return None
        try:
            value = eval(" ".join(expr), {"__builtins__": {}}, dict(known))  # noqa: S307
        except (SyntaxError, TypeError, ArithmeticError):
            return None
        return value if isinstance(value, int) else None

    # -- rendering --------------------------------------------------------------

    def ordered_records(self) -> list[Record]:
        return sorted(self.records.values(), key=lambda r: self.position[_decl_key(r.decl)])

    def enum_names(self) -> set[str]:
        return {d.spelling for d in self.enums.values() if not d.is_anonymous()}

    def ordered_enums(self) -> list[ci.Cursor]:
        return sorted(self.enums.values(), key=lambda d: self.position[_decl_key(d)])

    def fields_order(self) -> list[Record]:
        """Records with by-value dependencies first (ctypes needs complete types)."""
        done: set[str] = set()
        out: list[Record] = []

        def visit(rec: Record) -> None:
            key = _decl_key(rec.decl)
            if key in done:
                return
            done.add(key)
            for dep in rec.deps:
                visit(self.records[dep])
            out.append(rec)

        for rec in self.ordered_records():
            visit(rec)
        return out

    def render(self, version: str) -> tuple[str, list[Record]]:
        self.collect_roots()
        typedef_exprs = {n: self.type_expr(c.underlying_typedef_type, FIELD)
                         for n, c in self.typedefs.items()}
        functions, missing, inline = self.collect_functions()
        self.drain()
        records = self.ordered_records()
        enums = self.ordered_enums()

        names: dict[str, str] = {}

        def claim(name: str, what: str) -> None:
            if keyword.iskeyword(name) or name in ("ctypes", "lib", "FUNCTIONS"):
                raise GenerationError(f"{what} {name!r} is not a usable Python name")
            if name in names:
                raise GenerationError(f"name clash: {name!r} is both {names[name]} and {what}")
            names[name] = what

        out = [f"# generated by ci/gen_bindings.py from libbpf {version} headers — do not edit",
               '"""ctypes bindings for libbpf.so.1 (regenerate with `make bindings`)."""',
               "# ruff: noqa", "# fmt: off", "import ctypes", "",
               f'lib = ctypes.CDLL("{SONAME}", use_errno=True)', "", "", "# --- enums ---"]
        for decl in enums + [e for e in self.helper_enums if e.spelling not in self.enum_names()]:
            underlying = PRIMITIVES[decl.enum_type.get_canonical().kind]
            out.append("")
            if not decl.is_anonymous():
                claim(decl.spelling, "enum")
                out.append(f"{decl.spelling} = {underlying}")
            for e in decl.get_children():
                if e.kind == CK.ENUM_CONSTANT_DECL:
                    claim(e.spelling, "enum constant")
                    out.append(f"{e.spelling} = {_fmt_int(e.enum_value)}")
        for rec in records:
            claim(rec.name, "record")
        for name in self.typedefs:
            claim(name, "typedef")
        macros = self.collect_macros(set(names))
        out += ["", "", "# --- integer macros ---", ""]
        out += [f"{n} = {_fmt_int(v)}" for n, v in macros]
        out += ["", "", "# --- records (declared first; _fields_ are assigned below) ---"]
        for rec in records:
            out += ["", "", f"class {rec.name}({rec.base}):"]
            if rec.definition is None:
                out.append("    pass  # opaque")
            if rec.packed:
                out.append("    _pack_ = 1")
            if rec.anonymous:
                anon = ", ".join(f'"{a}"' for a in rec.anonymous)
                out.append(f"    _anonymous_ = ({anon},)")
            if rec.definition is not None and not rec.packed and not rec.anonymous:
                out.append("    pass")
        out += ["", "", "# --- typedefs ---", ""]
        out += [f"{n} = {e}" for n, e in typedef_exprs.items() if n != e]
        out += ["", "", "# --- record fields ---"]
        for rec in self.fields_order():
            if rec.definition is None:
                continue
            out += ["", f"{rec.name}._fields_ = ["]
            for f in rec.fields:
                bits = "" if f.bits is None else f", {f.bits}"
                out.append(f'    ("{f.name}", {f.ctype}{bits}),')
            out.append("]")
        out += self.render_functions(functions, missing, inline, claim)
        return "\n".join(out) + "\n", records

    @staticmethod
    def render_functions(functions: list[Function], missing: list[str], inline: list[str],
                         claim) -> list[str]:
        out = ["", "", "# --- functions ---"]
        shadowed: list[str] = []
        for fn in functions:
            out += ["", f"lib.{fn.name}.restype = {fn.restype}",
                    f"lib.{fn.name}.argtypes = [{', '.join(fn.argtypes)}]"
                    + ("  # variadic: fixed part only" if fn.variadic else "")]
            try:
                claim(fn.name, "function")
                out.append(f"{fn.name} = lib.{fn.name}")
            except GenerationError:
                shadowed.append(fn.name)
                out.append(f"# {fn.name}: module name taken by the record; call lib.{fn.name}")
        out += ["", "", "FUNCTIONS = ("]
        out += [f'    "{fn.name}",' for fn in functions]
        out.append(")")
        for title, names in (
                (f"Not bound: declared LIBBPF_API but not exported by {SONAME}", missing),
                ("Bound as lib.NAME only (module-level name is the struct of that name)", shadowed),
                (f"Not bound: static inline header helpers (not in {SONAME})", inline)):
            out += ["", f"# {title}:"]
            line = "#"
            for name in names or ["(none)"]:
                if len(line) + len(name) + 1 > 79:
                    out.append(line)
                    line = "#"
                line += " " + name
            out.append(line)
        return out


def _ctypes_bit_offset(descr) -> int:
    """Absolute bit offset of a ctypes field descriptor (little endian)."""
    if hasattr(descr, "bit_offset"):  # Python >= 3.14
        return descr.byte_offset * 8 + descr.bit_offset
    if descr.size >> 16:  # bitfield: size = (bit width << 16) | bit offset
        return descr.offset * 8 + (descr.size & 0xFFFF)
    return descr.offset * 8


def self_check(source: str, records: list[Record]) -> None:
    """Execute the generated module and compare every layout with clang's."""
    ns: dict = {}
    try:
        exec(compile(source, "<generated _libbpf.py>", "exec"), ns)  # noqa: S102
    except Exception as exc:  # any failure here is a generator bug
        raise GenerationError(f"generated module does not load: {exc!r}") from exc
    problems: list[str] = []
    for rec in records:
        if rec.definition is None:
            continue
        cls, ctype = ns[rec.name], rec.definition.type
        if ctypes.sizeof(cls) != ctype.get_size():
            problems.append(f"{rec.name}: sizeof {ctypes.sizeof(cls)} != clang {ctype.get_size()}")
        if ctypes.alignment(cls) != ctype.get_align():
            problems.append(f"{rec.name}: alignment {ctypes.alignment(cls)} != clang {ctype.get_align()}")
        for f in rec.fields:
            got = _ctypes_bit_offset(cls.__dict__[f.name])
            if got != f.bit_offset:
                problems.append(f"{rec.name}.{f.name}: bit offset {got} != clang {f.bit_offset}")
    if problems:
        raise GenerationError("ctypes layout differs from clang:\n  " + "\n  ".join(problems))


def generate() -> str:
    """Return the text of the bindings module (after the layout self-check)."""
    gen = Generator(parse_headers(), parse_headers(HELPERS_SOURCE))
    source, records = gen.render(libbpf_version())
    self_check(source, records)
    return source


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the module (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        source = generate()
    except GenerationError as exc:
        print(f"gen_bindings: error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
