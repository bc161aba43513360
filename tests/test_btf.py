"""Tests of tuplet.bpf.btf: BTF of tiny BPF objects compiled here, the kernel's BTF, errors."""
from __future__ import annotations

import ctypes
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

try:
    import tuplet  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loader"))

from tuplet.bpf.btf import (
    Btf,
    BtfArray,
    BtfEnum,
    BtfError,
    BtfMember,
    BtfNotFoundError,
    BtfVarSecinfo,
    Kind,
    load_btf_from_elf,
)
from tuplet.bpf.btf_layout import numpy_dtype, struct_layout
from tuplet.bpf.objects import ObjectSpec, datasec_var
from tuplet.core.errors import NotFoundError

VMLINUX = Path("/sys/kernel/btf/vmlinux")

SOURCE = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef __u16 __be16;
typedef __u32 __be32;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

struct tuple {
	__be32 daddr;
	__be32 saddr;
	__be16 dport;
	__be16 sport;
	__u8 nexthdr;
	__u8 flags;
} __attribute__((packed));

struct entry {
	__u64 reserved0;
	__u64 backend_id;
	__u64 packets;
	__u64 bytes;
	__u32 lifetime;
	__u16 rx_closing:1,
	      tx_closing:1,
	      reserved1:1,
	      lb_loopback:1,
	      seen_non_syn:1,
	      node_port:1,
	      proxy_redirect:1,
	      dsr_internal:1,
	      from_l7lb:1,
	      reserved2:1,
	      from_tunnel:1,
	      reserved3:5;
	__u16 rev_nat_index;
	__u16 ifindex;
	__u8 tx_flags_seen;
	__u8 rx_flags_seen;
	__u32 src_sec_id;
	__u32 last_tx_report;
	__u32 last_rx_report;
};

enum reason {
	REASON_PASS = 0,
	REASON_REPLY = 2,
	REASON_DROP_BASE = 128,
	REASON_DROP_INVALID = 128,
	TPL_REASON_SLOTS = 256,
};

struct inner {
	__u16 a;
	__u8 b[6];
};

struct event {
	__u32 kind;
	union {
		__u32 addr;
		__u8 addr_bytes[4];
		struct {
			__u16 lo;
			__u16 hi;
		};
	};
	struct inner in[2];
	const volatile __u64 stamp;
	enum reason why;
	__s8 delta:3, other:5;
	__u8 data[];
};

struct odd {
	__u8 a;
	__u16 b:12, c:4;
} __attribute__((packed));

typedef struct entry entry_t;

struct {
	__uint(type, 1);
	__type(key, struct tuple);
	__type(value, struct entry);
	__uint(max_entries, 16);
} ct_map SEC(".maps");

struct event ev_global;
struct odd odd_global;
entry_t entry_global;
enum reason reason_global;
"""


def _compile(tmp: Path, source: str, debug: bool = True) -> Path:
    clang = shutil.which("clang") or shutil.which("clang-14")
    if clang is None:
        pytest.skip("clang not installed")
    src, obj = tmp / "t.bpf.c", tmp / "t.bpf.o"
    src.write_text(source)
    cmd = [clang, "-O2", "-target", "bpf", "-c", str(src), "-o", str(obj)]
    if debug:
        cmd.insert(2, "-g")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return obj


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory.mktemp("btf"), SOURCE)


@pytest.fixture(scope="module")
def btf(obj: Path) -> Iterator[Btf]:
    with load_btf_from_elf(obj) as b:
        yield b


# --- Compiled objects. ---

def test_packed_tuple(btf: Btf) -> None:
    lay = struct_layout(btf, "tuple")
    assert lay.name == "struct tuple" and lay.size == 14 and btf.sizeof("tuple") == 14
    got = [(m.name, m.offset_bytes, m.size_bytes, m.bit_offset, m.bit_size, m.type_name)
           for m in lay.members]
    assert got == [
        ("daddr", 0, 4, 0, 0, "__be32"),
        ("saddr", 4, 4, 32, 0, "__be32"),
        ("dport", 8, 2, 64, 0, "__be16"),
        ("sport", 10, 2, 80, 0, "__be16"),
        ("nexthdr", 12, 1, 96, 0, "__u8"),
        ("flags", 13, 1, 104, 0, "__u8"),
    ]
    assert lay.bitfields == ()
    dt = numpy_dtype(btf, "tuple")
    assert dt.itemsize == 14
    assert dt.names == ("daddr", "saddr", "dport", "sport", "nexthdr", "flags")
    assert [dt.fields[n][1] for n in dt.names] == [0, 4, 8, 10, 12, 13]
    assert dt["daddr"] == np.dtype("<u4") and dt["dport"] == np.dtype("<u2")
    assert dt["flags"] == np.dtype("u1")

    be = numpy_dtype(btf, "tuple", be_typedefs=True)
    assert be["daddr"] == np.dtype(">u4") and be["sport"] == np.dtype(">u2")
    rec = np.frombuffer(bytes([10, 0, 0, 1]) + bytes(4) + b"\x00\x50" + bytes(4), dtype=be)[0]
    assert rec["daddr"] == 0x0A000001 and rec["dport"] == 80


def test_bitfield_entry(btf: Btf) -> None:
    lay = struct_layout(btf, "struct entry")
    assert lay.size == 56
    names = [m.name for m in lay.members]
    assert names[:6] == ["reserved0", "backend_id", "packets", "bytes", "lifetime", "rx_closing"]
    flags = ["rx_closing", "tx_closing", "reserved1", "lb_loopback", "seen_non_syn", "node_port",
             "proxy_redirect", "dsr_internal", "from_l7lb", "reserved2", "from_tunnel"]
    for i, name in enumerate(flags):
        m = lay.member(name)
        assert (m.offset_bytes, m.size_bytes, m.bit_offset, m.bit_size) == (36, 2, 288 + i, 1)
        assert m.is_bitfield and m.type_name == "__u16"
    r3 = lay.member("reserved3")
    assert (r3.bit_offset, r3.bit_size) == (299, 5)
    after = {m.name: m.offset_bytes for m in lay.members if not m.is_bitfield}
    assert after == {"reserved0": 0, "backend_id": 8, "packets": 16, "bytes": 24, "lifetime": 32,
                     "rev_nat_index": 38, "ifindex": 40, "tx_flags_seen": 42,
                     "rx_flags_seen": 43, "src_sec_id": 44, "last_tx_report": 48,
                     "last_rx_report": 52}

    assert [bf.name for bf in lay.bitfields] == flags + ["reserved3"]
    assert {bf.storage for bf in lay.bitfields} == {"_bits_36"}
    assert [bf.shift for bf in lay.bitfields] == list(range(11)) + [11]

    dt = numpy_dtype(btf, "entry")
    assert dt.itemsize == 56
    assert "rx_closing" not in dt.names
    assert dt.fields["_bits_36"] == (np.dtype("<u2"), 36)
    assert dt.fields["rev_nat_index"][1] == 38 and dt.fields["last_rx_report"][1] == 52
    assert list(dt.names) == sorted(dt.names, key=lambda n: dt.fields[n][1])

    arr = np.zeros(3, dtype=dt)
    arr["_bits_36"] = [0b1, 0b100_0000_0010, (0b10110 << 11) | 0b100000]
    by_name = {bf.name: bf for bf in lay.bitfields}
    assert by_name["rx_closing"].get(arr).tolist() == [1, 0, 0]
    assert by_name["tx_closing"].get(arr).tolist() == [0, 1, 0]
    assert by_name["from_tunnel"].get(arr).tolist() == [0, 1, 0]
    assert by_name["node_port"].get(arr).tolist() == [0, 0, 1]
    assert by_name["reserved3"].get(arr).tolist() == [0, 0, 0b10110]
    assert by_name["node_port"].get(arr[2]) == 1
    assert by_name["reserved3"].extract(0xFFFF) == 31

    # A typedef of the struct gives the same layout.
    assert struct_layout(btf, "entry_t").members == lay.members


def test_enum(btf: Btf) -> None:
    values = btf.enum_values("reason")
    assert values == {"REASON_PASS": 0, "REASON_REPLY": 2, "REASON_DROP_BASE": 128,
                      "REASON_DROP_INVALID": 128, "TPL_REASON_SLOTS": 256}
    assert btf.enum_values("enum reason") == values
    t = btf.find("reason", Kind.ENUM)
    assert t.kind == Kind.ENUM and t.size == 4 and not t.signed
    assert btf.sizeof(t.id) == 4


def test_nested_anonymous_union(btf: Btf) -> None:
    lay = struct_layout(btf, "event")
    m = {x.name: x for x in lay.members}
    assert [x.name for x in lay.members] == [
        "kind", "addr", "addr_bytes", "lo", "hi", "in", "stamp", "why", "delta", "other", "data"]
    assert (m["addr"].offset_bytes, m["addr_bytes"].offset_bytes) == (4, 4)
    assert (m["lo"].offset_bytes, m["hi"].offset_bytes) == (4, 6)
    assert m["addr_bytes"].type_name == "__u8[4]" and m["addr_bytes"].size_bytes == 4
    assert m["in"].type_name == "struct inner[2]" and m["in"].offset_bytes == 8
    assert m["in"].size_bytes == 16 and btf.sizeof("inner") == 8
    assert m["stamp"].offset_bytes == 24 and m["stamp"].type_name == "const volatile __u64"
    assert m["why"].offset_bytes == 32 and m["why"].type_name == "enum reason"
    assert (m["delta"].bit_offset, m["delta"].bit_size) == (288, 3)
    assert (m["other"].bit_offset, m["other"].bit_size) == (291, 5)
    assert m["data"].offset_bytes == 37 and m["data"].size_bytes == 0
    assert lay.size == btf.sizeof("struct event") == 40

    dt = numpy_dtype(btf, "event")
    assert dt.itemsize == 40
    assert dt.fields["addr"] == (np.dtype("<u4"), 4)
    assert dt.fields["addr_bytes"] == (np.dtype(("u1", (4,))), 4)
    assert dt.fields["hi"] == (np.dtype("<u2"), 6)
    assert dt.fields["stamp"] == (np.dtype("<u8"), 24)
    assert dt.fields["why"] == (np.dtype("<u4"), 32)
    assert dt.fields["_bits_36"] == (np.dtype("u1"), 36)  # storage units are unsigned
    inner, off = dt.fields["in"]
    assert off == 8 and inner.shape == (2,)
    assert inner.base.names == ("a", "b") and inner.base.itemsize == 8
    assert inner.base.fields["b"] == (np.dtype(("u1", (6,))), 2)

    rec = np.zeros(1, dtype=dt)
    rec["addr"] = 0x11223344
    assert rec["lo"][0] == 0x3344 and rec["hi"][0] == 0x1122
    assert rec["addr_bytes"][0].tolist() == [0x44, 0x33, 0x22, 0x11]
    bfs = {bf.name: bf for bf in lay.bitfields}
    assert bfs["delta"].signed
    rec["_bits_36"] = (3 << 3) | 0b101
    assert bfs["delta"].get(rec).tolist() == [-3]
    assert bfs["other"].get(rec).tolist() == [3]


def test_packed_straddling_bitfield(btf: Btf) -> None:
    lay = struct_layout(btf, "odd")
    assert lay.size == 3
    b, c = lay.member("b"), lay.member("c")
    assert (b.bit_offset, b.bit_size, b.offset_bytes, b.size_bytes) == (8, 12, 1, 2)
    assert (c.bit_offset, c.bit_size) == (20, 4)
    assert {bf.storage for bf in lay.bitfields} == {"_bits_1"}
    dt = numpy_dtype(btf, "odd")
    assert dt.itemsize == 3 and dt.fields["_bits_1"] == (np.dtype("<u2"), 1)
    rec = np.frombuffer(bytes([7, 0x34, 0x92]), dtype=dt)
    bfs = {bf.name: bf for bf in lay.bitfields}
    assert bfs["b"].get(rec).tolist() == [0x234] and bfs["c"].get(rec).tolist() == [9]


def test_lookup_and_resolve(btf: Btf) -> None:
    t = btf.find("entry_t")
    assert t.kind == Kind.TYPEDEF
    st = btf.resolve("entry_t")
    assert st.name == "entry" and st.kind == Kind.STRUCT
    u8 = btf.resolve("__be16")
    assert u8.kind == Kind.INT and u8.size == 2 and not u8.signed
    assert btf.find("ct_map", "var").kind == Kind.VAR
    assert btf.type_name(btf.find("__be32").id) == "__be32"
    with pytest.raises(BtfNotFoundError):
        btf.find("no_such_type")
    with pytest.raises(BtfNotFoundError):
        btf.find("tuple", Kind.UNION)
    with pytest.raises(BtfError, match="not a struct"):
        struct_layout(btf, "reason")
    with pytest.raises(BtfError, match="not an enum"):
        btf.enum_values("tuple")
    with pytest.raises(BtfError, match="not a struct"):
        numpy_dtype(btf, "__u32")
    with pytest.raises(BtfNotFoundError):
        btf[len(btf)]
    with pytest.raises(BtfNotFoundError):
        struct_layout(btf, "tuple").member("nope")


# --- The kernel's BTF. ---

@pytest.fixture(scope="module")
def vmlinux() -> Iterator[Btf]:
    if not VMLINUX.exists():
        pytest.skip(f"{VMLINUX} does not exist (kernel built without CONFIG_DEBUG_INFO_BTF)")
    with Btf.from_file(VMLINUX) as b:
        yield b


def test_vmlinux_iphdr(vmlinux: Btf) -> None:
    lay = struct_layout(vmlinux, "iphdr")
    assert lay.size == 20
    ihl, version = lay.member("ihl"), lay.member("version")
    assert (ihl.bit_offset, ihl.bit_size, version.bit_offset, version.bit_size) == (0, 4, 4, 4)
    assert lay.member("protocol").offset_bytes == 9
    assert lay.member("saddr").offset_bytes == 12 and lay.member("daddr").offset_bytes == 16
    dt = numpy_dtype(vmlinux, "iphdr")
    assert dt.itemsize == 20 and dt.fields["daddr"][1] == 16
    assert vmlinux.sizeof("struct ethhdr") == 14


def test_vmlinux_enums(vmlinux: Btf) -> None:
    attach = vmlinux.enum_values("bpf_attach_type")
    assert "BPF_TCX_INGRESS" in attach and attach["BPF_CGROUP_INET_INGRESS"] == 0
    assert vmlinux.enum_values("bpf_map_type")["BPF_MAP_TYPE_HASH"] == 1
    assert vmlinux.enum_values("rpm_status")["RPM_INVALID"] == -1  # signed (kind_flag) ENUM
    enum64 = [t for t in map(vmlinux.__getitem__, range(len(vmlinux))) if t.kind == Kind.ENUM64]
    assert enum64 and all(t.size == 8 for t in enum64)
    perf_txn = next(v for v in map(vmlinux.enum_values, (t.id for t in enum64)) if "PERF_TXN_ABORT_MASK" in v)
    assert perf_txn["PERF_TXN_ABORT_MASK"] == 0xFFFFFFFF00000000


def test_vmlinux_big_structs(vmlinux: Btf) -> None:
    for name in ("sk_buff", "task_struct", "bpf_attr"):
        assert numpy_dtype(vmlinux, name).itemsize == vmlinux.sizeof(name) > 0


# --- Malformed input. ---

def _header(type_len: int, str_len: int, magic: int = 0xEB9F, version: int = 1) -> bytes:
    return struct.pack("<HBBIIIII", magic, version, 0, 24, 0, type_len, type_len, str_len)


def _tiny_blob() -> bytes:
    strings = b"\0int\0"
    types = struct.pack("<IIII", 1, 1 << 24, 4, (1 << 24) | 32)  # INT 'int' size 4, signed
    return _header(len(types), len(strings)) + types + strings


def test_tiny_blob() -> None:
    btf = Btf.from_bytes(_tiny_blob())
    t = btf.find("int")
    assert t.kind == Kind.INT and t.signed and t.bits == 32 and btf.sizeof("int") == 4


def test_blob_kinds() -> None:
    """Kinds clang 14 does not emit: an INT-encoded bitfield (kind_flag 0), ENUM64, FLOAT."""
    strings = b"\0u8\0s\0x\0y\0e\0BIG\0NEG\0double\0"
    types = b"".join([
        struct.pack("<IIII", 1, 1 << 24, 1, 8),                  # [1] INT u8 size 1, 8 bits
        struct.pack("<IIII", 0, 1 << 24, 1, (1 << 24) | 3),      # [2] INT size 1, 3 bits, signed
        struct.pack("<III", 4, (4 << 24) | 2, 2),                 # [3] STRUCT s size 2, vlen 2
        struct.pack("<III", 6, 1, 0) + struct.pack("<III", 8, 2, 9),  # x: u8 @0, y @bit 9
        struct.pack("<III", 10, (1 << 31) | (19 << 24) | 2, 8),   # [4] ENUM64 e, signed
        struct.pack("<III", 12, 0x89ABCDEF, 0x12345678),
        struct.pack("<III", 16, 0xFFFFFFFE, 0xFFFFFFFF),
        struct.pack("<III", 20, 16 << 24, 8),                     # [5] FLOAT double
    ])
    btf = Btf.from_bytes(_header(len(types), len(strings)) + types + strings)
    lay = struct_layout(btf, "s")
    y = lay.member("y")
    assert (y.bit_offset, y.bit_size, y.offset_bytes, y.size_bytes) == (9, 3, 1, 1)
    (bf,) = lay.bitfields
    assert (bf.storage, bf.shift, bf.signed) == ("_bits_1", 1, True)
    assert bf.extract(0b1000) == -4
    assert btf.enum_values("e") == {"BIG": 0x1234567889ABCDEF, "NEG": -2}
    assert btf.sizeof("double") == 8 and btf.find("double").kind == Kind.FLOAT


@pytest.mark.parametrize("data", [
    b"",
    b"\x9f\xeb\x01",
    b"\x00" * 32,
    _header(0, 1, magic=0x1234) + b"\0",
    _tiny_blob()[:-3],
    _header(12, 1) + struct.pack("<III", 0, 31 << 24, 0) + b"\0",
])
def test_blob_rejected_by_libbpf(data: bytes) -> None:
    with pytest.raises(BtfError, match="BTF blob: parse: EINVAL"):
        Btf.from_bytes(data)


# --- Errors from libbpf and from a closed Btf. ---

def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.o"
    with pytest.raises(BtfNotFoundError, match=f"BTF of {re.escape(str(missing))}: parse: ENOENT") as e:
        load_btf_from_elf(missing)
    assert isinstance(e.value, NotFoundError) and e.value.errno == 2
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"not an elf file at all" * 4)
    with pytest.raises(BtfError, match=f"BTF of {re.escape(str(junk))}: parse: .*failed to get EHDR"):
        load_btf_from_elf(junk)
    plain = _compile(tmp_path, "int x = 1;\n", debug=False)
    with pytest.raises(BtfNotFoundError, match=r"parse: ENOENT.*failed to find '\.BTF' ELF section"):
        load_btf_from_elf(plain)
    with pytest.raises(BtfNotFoundError, match="ENOENT"):
        Btf.from_file(missing)


def test_lookup_errors(btf: Btf) -> None:
    with pytest.raises(BtfNotFoundError, match=r"BTF of .*t\.bpf\.o: find struct nope: no such type"):
        btf.find("struct nope")
    with pytest.raises(BtfNotFoundError, match="find no_such_name: no such type"):
        btf.enum_values("no_such_name")
    with pytest.raises(BtfNotFoundError, match="no such type"):
        btf[-1]
    with pytest.raises(BtfError, match="unknown kind 'nokind'"):
        btf.find("tuple", "nokind")
    with pytest.raises(BtfError, match="has no size"):
        btf.sizeof(0)  # void
    with pytest.raises(BtfError, match="not a DATASEC"):
        btf.datasec_vars("tuple")


def test_use_after_close(obj: Path) -> None:
    b = load_btf_from_elf(obj)
    t = b.find("tuple")
    assert not b.closed and len(b) > 1
    with b:
        pass
    assert b.closed
    b.close()  # idempotent
    assert t.name == "tuple"  # a BtfType is a copy
    for use in (lambda: b[t.id], lambda: b.find("tuple"), lambda: len(b), lambda: struct_layout(b, "tuple"),
                lambda: b.enum_values("reason"), lambda: numpy_dtype(b, t.id)):
        with pytest.raises(BtfError, match=r"BTF of .*: read: used after close"):
            use()


def test_object_btf_borrowed(obj: Path) -> None:
    """ObjectSpec.btf is libbpf's BTF of the opened object, unusable once the object is closed."""
    spec = ObjectSpec.open(obj)
    b = spec.btf
    assert struct_layout(b, "tuple").size == 14 and b.enum_values("reason")["TPL_REASON_SLOTS"] == 256
    var = datasec_var(b, ".bss", "odd_global")
    assert var.size == 3 and not var.signed
    with pytest.raises(NotFoundError, match="known: .*reason_global"):
        datasec_var(b, ".bss", "nope")
    with pytest.raises(NotFoundError, match="section .data"):
        datasec_var(b, ".data", "x")
    spec.close()
    assert b.closed and spec.btf is b
    with pytest.raises(BtfError, match=f"BTF of object {re.escape(str(obj))}: read: used after close"):
        b.find("tuple")


# struct btf_type (generated bindings) and the records after it, vs the kernel uapi header.
RECORDS = [("btf_type", None), ("btf_array", BtfArray), ("btf_member", BtfMember),
           ("btf_enum", BtfEnum), ("btf_var_secinfo", BtfVarSecinfo), ("btf_enum64", None)]


def test_record_layouts_match_uapi(tmp_path: Path) -> None:
    import tuplet.bpf._libbpf as C
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None or not Path("/usr/include/linux/btf.h").exists():
        pytest.skip("no C compiler or no linux/btf.h")
    classes = {name: cls or getattr(C, name) for name, cls in RECORDS}
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/btf.h>", "int main(void) {"]
    for name, cls in classes.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field, *_ in cls._fields_:
            if not field.startswith("_"):
                lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    (tmp_path / "sizes.c").write_text("\n".join(lines + ["return 0; }"]) + "\n")
    subprocess.run([cc, "-o", str(tmp_path / "sizes"), str(tmp_path / "sizes.c")], check=True)
    got = dict(line.split() for line in subprocess.run([str(tmp_path / "sizes")], check=True,
                                                       capture_output=True, text=True).stdout.splitlines())
    want = {}
    for name, cls in classes.items():
        want[name] = str(ctypes.sizeof(cls))
        for field, *_ in cls._fields_:
            if not field.startswith("_"):
                want[f"{name}.{field}"] = str(getattr(cls, field).offset)
    assert got == want
