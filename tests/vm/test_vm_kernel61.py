"""The datapath on Debian's 6.1 kernel (no TCX), inside the VM `make vm-test` boots.

The same objects the host builds must pass the 6.1 verifier, `attach_mode = "auto"` must fall back to legacy
TC there, and pods must talk through it. Geneve (absent from the host kernel) is checked for later use.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from test_netns_ct6 import COUNTING, exchange_and_check
from test_netns_datapath import POD1, POD2, ct_lines, find, node_config, topo  # noqa: F401 (topo: fixture)
from traffic import LiveConnection, start_server, udp_once
from tuplet.bpf import _libbpf as C
from tuplet.bpf.libbpf import check
from tuplet.bpf.links import AttachMode, Hook, tc_has_filter, tcx_attach
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.core.errors import NotSupportedError
from tuplet.datapath import abi, paths
from tuplet.datapath.abi import OBJ_GC, OBJ_GC_ITER
from tuplet.node import apply as node_apply
from tuplet.node import config, netns, state
from two_pods import two_pods

pytestmark = pytest.mark.vm

OUT = Path(os.environ.get("TUPLET_VM_OUT", "/tmp"))


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int(minor)


def prog_sizes(coll: Collection) -> dict[str, tuple[int, int, int]]:
    """Per program: (instructions the verifier processed, xlated bytes, jited bytes)."""
    out = {}
    for name, prog in coll.programs.items():
        info = C.bpf_prog_info()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(C.bpf_obj_get_info_by_fd(prog.fd, ctypes.byref(info), ctypes.byref(size)), prog.what, "get info")
        out[name] = (int(info.verified_insns), int(info.xlated_prog_len), int(info.jited_prog_len))
    return out


def report(lines: list[str]) -> None:
    """Into the VM's output directory (the guest script prints it after the run)."""
    with open(OUT / "verifier-sizes.txt", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# --- (a) the kernel ------------------------------------------------------------------------------

def test_kernel_is_61_without_tcx() -> None:
    assert kernel_version() == (6, 1), platform.release()
    assert Path("/sys/kernel/btf/vmlinux").exists(), "no kernel BTF: CO-RE relocations cannot resolve"
    # The loader's own probe: a TCX link create is refused as unsupported (EINVAL on 6.1).
    ns = f"tpl-vm-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with ObjectSpec.open(paths.object_dir() / "pass.o") as spec:
            coll = spec.load()
        with coll, netns.enter(ns):
            prog = next(iter(coll.programs.values()))
            with pytest.raises(NotSupportedError, match="6.6"):
                tcx_attach(prog, "lo", Hook.INGRESS, "/sys/fs/bpf/tuplet/vm-probe")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    assert not Path("/sys/fs/bpf/tuplet/vm-probe").exists()


# --- (b) the 6.1 verifier ------------------------------------------------------------------------

@pytest.mark.parametrize("syn_table", [True, False], ids=["syn_table", "no_syn_table"])
def test_objects_pass_the_61_verifier(syn_table: bool) -> None:
    cfg = config.parse("" if syn_table else "[conntrack]\nsyn_table = false\n")
    assert cfg.conntrack.syn_table is syn_table
    lines = [f"kernel {platform.release()}, syn_table = {str(syn_table).lower()}: "
             "program, verified insns, xlated bytes, jited bytes"]
    # bpf_host.o twice: without an overlay (the DSR branch pruned) and with one (ifindex 1 stands in).
    for obj, overlay in ((abi.OBJ_LXC, 0), (abi.OBJ_HOST, 0), (abi.OBJ_HOST, 1),
                         (abi.OBJ_OVERLAY, 0)):
        spec = node_apply.open_object(obj, cfg, pin_root=None,   # default sizes: what apply would load
                                    overlay_ifindex=overlay)
        with spec.load() as coll:                              # VerifierError carries the log
            sizes = prog_sizes(coll)
        assert sizes, obj
        label = obj + ("+dsr" if overlay else "")
        lines += [f"  {label:16} {name:24} {v:7} {x:7} {j:7}" for name, (v, x, j) in sorted(sizes.items())]
    report(lines)


@pytest.mark.parametrize("obj", [OBJ_GC, OBJ_GC_ITER])
def test_gc_object_passes_the_61_verifier(obj: str) -> None:
    """The GC objects as tuplet.conntrack.gc loads them: the batch deleter (ct_gc.o) and the
    sliced iterator (ct_gc_iter.o; where a kernel refuses it GC uses the batch method)."""
    with ObjectSpec.open(paths.object_dir() / obj) as spec:
        for name in spec.maps:
            if "." not in name:                  # not a data section (ct_gc.bss, ...)
                spec.set_max_entries(name, 64)   # stand-ins, as tuplet.gc makes for maps it does not collect
        with spec.load() as coll:
            sizes = prog_sizes(coll)
    assert sizes
    report([f"kernel {platform.release()}: program, verified insns, xlated bytes, jited bytes"] +
           [f"  {obj:12} {name:24} {v:7} {x:7} {j:7}" for name, (v, x, j) in sorted(sizes.items())])


def test_sock_object_passes_the_61_verifier() -> None:
    """Socket LB's cgroup programs (bpf_sock.o), loaded as apply loads them."""
    with ObjectSpec.open(paths.object_dir() / abi.OBJ_SOCK) as spec:
        with spec.load() as coll:
            sizes = prog_sizes(coll)
    assert set(sizes) == {p for p, _ in abi.SOCK_HOOKS}
    report([f"kernel {platform.release()}: program, verified insns, xlated bytes, jited bytes"] +
           [f"  {abi.OBJ_SOCK:12} {name:24} {v:7} {x:7} {j:7}" for name, (v, x, j) in sorted(sizes.items())])


# --- (c) pods through the legacy TC fallback -----------------------------------------------------

def _bpftool_progs() -> list[str]:
    res = subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True)
    return [p.get("name", "") for p in json.loads(res.stdout or "[]")]


def _qdiscs(ns: str, ifname: str) -> list[str]:
    res = subprocess.run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", ifname], check=True, capture_output=True,
                         text=True)
    return [q["kind"] for q in json.loads(res.stdout or "[]")]


def test_auto_falls_back_to_tc_and_pods_talk(topo, pin_root) -> None:  # noqa: F811
    cfg = config.parse(node_config(topo, pin_root, "auto"))
    node_apply.apply(cfg)
    try:
        st = state.load(pin_root)
        assert {a.mode for a in st.attachments} == {AttachMode.TC}, st.attachments
        assert len(st.attachments) == 4
        assert not (Path(pin_root) / "links").exists() or not os.listdir(Path(pin_root) / "links")
        with netns.enter(topo.node.netns):
            for pod in (topo.p1, topo.p2):
                assert tc_has_filter(pod.host_ifname, Hook.INGRESS)
                assert tc_has_filter(pod.host_ifname, Hook.EGRESS)

        srv = start_server(topo, topo.p2, 8000)
        try:
            conn = LiveConnection(topo, topo.p1, POD2, 8000)
            assert conn.roundtrip("hello") == "hello"
            conn.close()
            udp_once(topo, topo.p1, POD2, 8000, 40001)
            time.sleep(0.3)   # the final ACK of the close
        finally:
            srv.kill()
            srv.wait()

        recs = ct_lines(pin_root)
        for r in (find(recs, "TCP", "OUT", sport=conn.sport), find(recs, "TCP", "IN", sport=conn.sport)):
            line = r.line()
            assert line.startswith(f"TCP {r.direction} {POD1}:{conn.sport} -> {POD2}:8000 expires=")
            assert "RxFlagsSeen=0x1b" in line and "TxFlagsSeen=0x1b" in line, line
            assert "Flags=0x0013 [ RxClosing TxClosing SeenNonSyn ] RevNAT=0 SourceSecurityID=3096" in line, line
            assert "Packets=0 Bytes=0" in line, line   # accounting off by default
        u = find(recs, "UDP", "OUT", sport=40001)
        assert u.dst == (POD2, 8000) and u.entry.packets == 0 and u.entry.src_sec_id == 3096
        find(recs, "UDP", "IN", sport=40001)
        assert {"cil_from_container", "cil_to_container"} <= set(_bpftool_progs())
    finally:
        node_apply.teardown(pin_root)

    # Nothing left: no filter or clsact on the veths, no pin, no state, no program.
    assert state.load(pin_root) is None
    assert not Path(pin_root).exists() or not any(Path(pin_root).iterdir()), list(Path(pin_root).iterdir())
    for pod in (topo.p1, topo.p2):
        assert "clsact" not in _qdiscs(topo.node.netns, pod.host_ifname)
    assert not {"cil_from_container", "cil_to_container", "cil_from_netdev", "cil_to_netdev"} & set(_bpftool_progs())


@pytest.fixture
def topo6():
    yield from two_pods(dual_stack=True)


def test_ipv6_pods_talk_over_tc(topo6, pin_root) -> None:
    """Dual-stack pods over IPv6 through the legacy TC fallback: entries in the IPv6 tables only."""
    node_apply.apply(config.parse(node_config(topo6, pin_root, "auto", extra=COUNTING)))
    try:
        st = state.load(pin_root)
        assert {a.mode for a in st.attachments} == {AttachMode.TC}, st.attachments
        exchange_and_check(topo6, pin_root)
    finally:
        node_apply.teardown(pin_root)
    assert not Path(pin_root).exists() or not any(Path(pin_root).iterdir()), list(Path(pin_root).iterdir())


def test_forced_tcx_fails_clearly_and_changes_nothing(topo, pin_root) -> None:  # noqa: F811
    with pytest.raises(NotSupportedError, match="6.6"):
        node_apply.apply(config.parse(node_config(topo, pin_root, "tcx")))
    assert state.load(pin_root) is None
    assert not Path(pin_root).exists() or not any(Path(pin_root).iterdir()), list(Path(pin_root).iterdir())
    for pod in (topo.p1, topo.p2):
        assert "clsact" not in _qdiscs(topo.node.netns, pod.host_ifname)


# --- (d) Geneve ----------------------------------------------------------------------------------

def test_geneve_external_device() -> None:
    subprocess.run(["modprobe", "geneve"], check=True)
    ns = f"tpl-vm-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "tpl-vm-gnv", "type", "geneve", "external"], check=True)
        res = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show", "tpl-vm-gnv"], check=True,
                             capture_output=True, text=True)
        info = json.loads(res.stdout)[0]["linkinfo"]
        assert info["info_kind"] == "geneve" and info["info_data"].get("external") is True, info
        subprocess.run(["ip", "-n", ns, "link", "set", "tpl-vm-gnv", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "del", "tpl-vm-gnv"], check=True)
        res = subprocess.run(["ip", "-n", ns, "link", "show", "tpl-vm-gnv"], capture_output=True, text=True)
        assert res.returncode != 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
