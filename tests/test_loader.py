"""The loader on real objects: errors, pins, constants, batch map operations."""
from __future__ import annotations

import errno
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tuplet.bpf.objects import ObjectSpec
from tuplet.cli.main import parser as cli_parser
from tuplet.core.errors import IncompatiblePinError, NotFoundError, TupletError, VerifierError
from tuplet.datapath.abi import CT_MAP_ANY, CT_MAP_TCP, OBJ_LXC
from tuplet.datapath.layouts import CtEntry, CtTuple4
from tuplet.datapath.paths import object_dir

ROOT = Path(__file__).resolve().parents[1]

BAD_PROG = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
SEC("tc")
int reads_past_the_packet(struct __sk_buff *skb)
{
	unsigned char *data = (void *)(long)skb->data;
	return data[64];   /* no bounds check against data_end */
}
"""


def lxc_spec(pin_root: str | None = None, tcp_max: int = 2048) -> ObjectSpec:
    spec = ObjectSpec.open(object_dir() / OBJ_LXC, pin_root=pin_root)
    spec.set_max_entries(CT_MAP_TCP, tcp_max)
    spec.set_max_entries(CT_MAP_ANY, 1024)
    return spec


def test_verifier_rejection_carries_the_log(tmp_path: Path) -> None:
    src = tmp_path / "bad.bpf.c"
    src.write_text(BAD_PROG)
    obj = tmp_path / "bad.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I", str(ROOT / "vmlinux"), "-c", str(src),
                    "-o", str(obj)], check=True)
    with pytest.raises(VerifierError) as exc:
        ObjectSpec.open(obj).load()
    e = exc.value
    assert e.program == "reads_past_the_packet"
    assert "invalid access to packet" in e.log
    assert "verifier rejected it" in str(e) and "invalid access to packet" in str(e)


def test_missing_object_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="make"):
        ObjectSpec.open(tmp_path / "nope.o")


def test_constants_are_checked() -> None:
    with lxc_spec() as spec:
        spec.set_const("ct_syn_timeout", 5)
        assert spec.get_const("ct_syn_timeout") == 5
        with pytest.raises(NotFoundError, match="ct_lifetime_tcp"):
            spec.set_const("no_such_setting", 1)
        with pytest.raises(TupletError, match="does not fit"):
            spec.set_const("ct_report_flags", 256)


def test_pinned_maps_are_reused_with_their_entries(pin_root: str) -> None:
    key = CtTuple4.make("10.0.0.1", "10.0.0.2", 80, 1234, 6, 0)
    with lxc_spec(pin_root).load() as coll:
        coll.maps[CT_MAP_TCP].update(key, CtEntry(lifetime=4242))
    assert os.path.exists(f"{pin_root}/{CT_MAP_TCP}")
    spec = lxc_spec(pin_root)
    assert f"{pin_root}/{CT_MAP_TCP}" in spec.check_pins()
    with spec.load() as coll:
        got = CtEntry.from_buffer_copy(coll.maps[CT_MAP_TCP].lookup(key))
        assert got.lifetime == 4242


def test_incompatible_pin_is_refused_untouched(pin_root: str) -> None:
    key = CtTuple4.make("10.0.0.1", "10.0.0.2", 80, 1234, 6, 0)
    with lxc_spec(pin_root).load() as coll:
        coll.maps[CT_MAP_TCP].update(key, CtEntry(lifetime=7))
    with pytest.raises(IncompatiblePinError, match="max entries: pinned 2048, wanted 4096") as exc:
        lxc_spec(pin_root, tcp_max=4096).load()
    assert exc.value.path == f"{pin_root}/{CT_MAP_TCP}"
    with lxc_spec(pin_root).load() as coll:
        assert coll.maps[CT_MAP_TCP].lookup(key) is not None
    # The command the error suggests exists, with these arguments, and names this pin root.
    hint = re.search(r"`(tuplet [^`]+)`", str(exc.value))
    assert hint, str(exc.value)
    args = shlex.split(hint.group(1))[1:]
    assert cli_parser().parse_args(args).pin_root == pin_root
    assert args[-1] == "teardown"


def test_batches_read_everything_and_grow_on_enospc() -> None:
    with lxc_spec(tcp_max=16384).load() as coll:
        m = coll.maps[CT_MAP_TCP]
        n = 10000
        for i in range(n):
            m.update(CtTuple4.make("10.1.0.1", "10.2.0.1", 80, i, 6, 0), CtEntry(lifetime=i))
        assert m.count() == n
        # One entry per batch: any bucket holding two entries answers ENOSPC first.
        seen = {CtEntry.from_buffer_copy(v).lifetime for _, v in m.items(chunk=1)}
        assert seen == set(range(n))
        keys = b"".join(bytes(CtTuple4.make("10.1.0.1", "10.2.0.1", 80, i, 6, 0)) for i in range(100))
        m.delete(CtTuple4.make("10.1.0.1", "10.2.0.1", 80, 50, 6, 0))   # already gone in the batch
        assert m.delete_batch(keys, 100) == 99
        assert m.count() == n - 100
        assert m.clear() == n - 100 and m.count() == 0


def test_maps_and_programs_of_a_closed_collection_refuse_use() -> None:
    """A Map or Program handed out by a Collection borrows its fd: after the collection
    closes, the number may name something else, so every use must fail, never act on it."""
    coll = lxc_spec().load()
    m, prog = coll.maps[CT_MAP_TCP], coll.programs["cil_from_container"]
    number = m.fd
    coll.close()
    reused = os.open("/dev/null", os.O_RDONLY)   # the lowest free number: likely the map's old one
    try:
        key = CtTuple4.make("10.0.0.1", "10.0.0.2", 80, 1234, 6, 0)
        for use in (lambda: m.lookup(key), lambda: m.update(key, CtEntry(lifetime=1)), lambda: m.count(),
                    lambda: prog.test_run(bytes(64))):
            with pytest.raises(TupletError, match="closed") as exc:
                use()
            assert exc.value.errno == errno.EBADF
        assert reused != number or os.path.samefile(f"/proc/self/fd/{reused}", "/dev/null")
    finally:
        os.close(reused)
