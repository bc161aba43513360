"""Tests for the generated libbpf ctypes bindings (loader/tuplet/bpf/_libbpf.py)."""
from __future__ import annotations

import ctypes
import difflib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATOR = REPO_ROOT / "ci" / "gen_bindings.py"
MODULE_PATH = REPO_ROOT / "loader" / "tuplet" / "bpf" / "_libbpf.py"

try:
    import tuplet  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO_ROOT / "loader"))

from tuplet.bpf import _libbpf as b  # noqa: E402

LAYOUT_STRUCTS = [
    "bpf_object_open_opts",
    "bpf_link_create_opts",
    "bpf_tc_hook",
    "bpf_tc_opts",
    "bpf_map_batch_opts",
    "bpf_test_run_opts",
    "bpf_prog_info",
    "bpf_map_info",
    "bpf_link_info",
    "bpf_prog_query_opts",
]
# Only in some libbpf versions; checked when the installed headers define them.
OPTIONAL_LAYOUT_STRUCTS = ["bpf_obj_get_opts", "bpf_obj_pin_opts"]
LIBBPF_HEADERS = [Path("/usr/include/bpf") / h for h in ("libbpf.h", "bpf.h", "btf.h")]


# -- (a) drift -----------------------------------------------------------------

def test_generated_module_is_up_to_date(tmp_path: Path) -> None:
    if importlib.util.find_spec("clang") is None:
        pytest.skip("libclang (python package 'clang') not installed")
    out = tmp_path / "_libbpf.py"
    proc = subprocess.run([sys.executable, str(GENERATOR), "--output", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"generator failed:\n{proc.stderr}"
    fresh, committed = out.read_text(), MODULE_PATH.read_text()
    if fresh != committed:
        diff = list(difflib.unified_diff(committed.splitlines(), fresh.splitlines(),
                                         "committed/_libbpf.py", "regenerated/_libbpf.py",
                                         lineterm="", n=1))
        excerpt = "\n".join(diff[:60]) + ("\n..." if len(diff) > 60 else "")
        pytest.fail("loader/tuplet/bpf/_libbpf.py is out of date with the libbpf headers; "
                    f"run `make bindings`.\n{excerpt}")


# -- (b) layout against gcc -------------------------------------------------------

def _layout_structs() -> list[str]:
    names = list(LAYOUT_STRUCTS)
    headers = "".join(h.read_text() for h in LIBBPF_HEADERS)
    for name in OPTIONAL_LAYOUT_STRUCTS:
        if re.search(rf"\bstruct\s+{name}\s*\{{", headers):
            names.append(name)
        else:
            assert not hasattr(b, name), f"{name} generated but absent from the headers"
    return names


def _field_designators(cls: type, prefix: str = "", base: int = 0) -> list[tuple[str, int]]:
    """(C member designator, byte offset) of every non-bitfield field, recursively."""
    out: list[tuple[str, int]] = []
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for entry in cls._fields_:
        name, ctype = entry[0], entry[1]
        if len(entry) == 3:  # bitfield: offsetof() is not valid C
            continue
        offset = base + cls.__dict__[name].offset
        is_record = isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))
        if name in anonymous:
            out += _field_designators(ctype, prefix, offset)
            continue
        out.append((prefix + name, offset))
        if is_record:
            out += _field_designators(ctype, f"{prefix}{name}.", offset)
    return out


def _tag(cls: type) -> str:
    return "union" if issubclass(cls, ctypes.Union) else "struct"


def test_struct_layout_matches_gcc(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    expected: dict[str, int] = {}
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <bpf/libbpf.h>",
             "#include <bpf/bpf.h>", "#include <bpf/btf.h>", "", "int main(void)", "{"]
    for name in _layout_structs():
        cls = getattr(b, name)
        ctag = f"{_tag(cls)} {name}"
        expected[f"sizeof {name}"] = ctypes.sizeof(cls)
        lines.append(f'\tprintf("sizeof {name} %zu\\n", sizeof({ctag}));')
        for designator, offset in _field_designators(cls):
            expected[f"offsetof {name}.{designator}"] = offset
            lines.append(f'\tprintf("offsetof {name}.{designator} %zu\\n", '
                         f"offsetof({ctag}, {designator}));")
    lines += ["\treturn 0;", "}", ""]
    src, exe = tmp_path / "layout.c", tmp_path / "layout"
    src.write_text("\n".join(lines))
    subprocess.run([gcc, "-Wall", "-o", str(exe), str(src)], check=True,
                   capture_output=True, text=True)
    actual = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        actual[key] = int(value)
    mismatches = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
    assert not mismatches, f"ctypes vs gcc (ctypes, gcc): {mismatches}"
    assert len(actual) == len(expected)


# -- (c) functions -------------------------------------------------------------------

def test_functions_are_typed_and_exported() -> None:
    source = MODULE_PATH.read_text()
    so = ctypes.CDLL("libbpf.so.1")
    assert len(b.FUNCTIONS) > 200
    for name in b.FUNCTIONS:
        assert re.search(rf"^lib\.{name}\.restype = ", source, re.M), f"{name}: restype unset"
        assert re.search(rf"^lib\.{name}\.argtypes = \[", source, re.M), f"{name}: argtypes unset"
        fn = getattr(b.lib, name)
        assert fn.argtypes is not None, name
        restype = fn.restype
        assert restype is None or issubclass(
            restype, (ctypes._SimpleCData, ctypes._Pointer, ctypes._CFuncPtr)), name
        so[name]  # raises AttributeError if libbpf.so.1 does not export it
        exposed = getattr(b, name)
        assert exposed is fn or isinstance(exposed, type), f"{name}: bad module-level alias"


def test_pointer_returns_are_not_truncated() -> None:
    assert b.bpf_object__open_file.restype is ctypes.POINTER(b.bpf_object)
    assert b.btf__load_vmlinux_btf.restype is ctypes.POINTER(b.btf)
    assert b.bpf_map__name.restype is ctypes.c_char_p
    assert b.libbpf_get_error.restype is ctypes.c_long
    assert b.bpf_object__open_file.argtypes[0] is ctypes.c_char_p
    assert b.libbpf_major_version() == 1


def test_constants_and_typedefs() -> None:
    for name in ("BPF_MAP_TYPE_LRU_HASH", "BPF_TC_INGRESS", "LIBBPF_PIN_BY_NAME", "BPF_ANY"):
        assert isinstance(getattr(b, name), int), name
    assert b.BPF_ANY == 0 and b.BPF_TC_INGRESS == 1
    # linux/bpf.h from Debian 12 (6.1 uapi) has no TCX; the loader defines those.
    assert not hasattr(b, "BPF_TCX_INGRESS")
    assert issubclass(b.libbpf_print_fn_t, ctypes._CFuncPtr)
    assert b.libbpf_print_fn_t._argtypes_[1:] == (ctypes.c_char_p, ctypes.c_void_p)
    assert ctypes.sizeof(b.bpf_object) == 0  # opaque
