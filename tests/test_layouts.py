"""The Python views of shared structs agree with the BTF of the built objects."""
from __future__ import annotations

import ctypes

import pytest

from tuplet.bpf.btf import load_btf_from_elf
from tuplet.bpf.btf_layout import struct_layout
from tuplet.datapath import abi
from tuplet.datapath.abi import OBJ_LXC, OBJ_SOCK, OBJ_SOCK_DESTROY
from tuplet.datapath.layouts import (
    CT_FLAG_BITS,
    CtEntry,
    CtNotifyCpu,
    CtNotifyCtl,
    CtNotifyRec,
    CtTuple4,
    CtTuple6,
    EndpointInfo,
    Ipcache6Key,
    IpcacheInfo,
    IpcacheKey,
    Lb4AffinityKey,
    Lb4Backend,
    Lb4Key,
    Lb4MaglevKey,
    Lb4ReverseNat,
    Lb4Service,
    Lb4SockRevKey,
    Lb4SockRevVal,
    Lb6AffinityKey,
    Lb6Backend,
    Lb6Key,
    Lb6ReverseNat,
    Lb6SockRevKey,
    Lb6SockRevVal,
    LbAffinityVal,
    MetricsValue,
    Nat4Entry,
    Nat6Entry,
    TplSignal,
)
from tuplet.datapath.metrics import reason_names
from tuplet.datapath.paths import object_dir


@pytest.fixture(scope="module")
def btf():
    return load_btf_from_elf(object_dir() / OBJ_LXC)


def bit_offset(cls: type[ctypes.Structure], name: str) -> tuple[int, int]:
    """(bit offset, bit size) of a ctypes field, bitfields included."""
    f = getattr(cls, name)
    if f.size > 0xFFFF:   # ctypes packs bitfields as (bit size << 16) | bit offset
        return f.offset * 8 + (f.size & 0xFFFF), f.size >> 16
    return f.offset * 8, 0


@pytest.mark.parametrize("cls,cname", [(CtTuple4, "ipv4_ct_tuple"), (CtTuple6, "ipv6_ct_tuple"),
                                       (Ipcache6Key, "ipcache6_key"), (CtEntry, "ct_entry"),
                                       (EndpointInfo, "endpoint_info"),
                                       (IpcacheKey, "ipcache_key"), (IpcacheInfo, "ipcache_info"), (MetricsValue, "metrics_value"),
                                       (Nat4Entry, "nat4_entry"), (Nat6Entry, "nat6_entry"), (TplSignal, "tpl_signal"),
                                       (CtNotifyRec, "ct_notify_rec"), (CtNotifyCtl, "ct_notify_ctl"),
                                       (CtNotifyCpu, "ct_notify_cpu"),
                                       (Lb4Key, "lb4_key"), (Lb4Service, "lb4_service"),
                                       (Lb4Backend, "lb4_backend"), (Lb4ReverseNat, "lb4_reverse_nat"),
                                       (Lb4MaglevKey, "lb4_maglev_key"), (Lb4AffinityKey, "lb4_affinity_key"),
                                       (LbAffinityVal, "lb_affinity_val"),
                                       (Lb6Key, "lb6_key"), (Lb6Backend, "lb6_backend"),
                                       (Lb6ReverseNat, "lb6_reverse_nat"), (Lb6AffinityKey, "lb6_affinity_key")])
def test_struct_matches_btf(btf, cls, cname) -> None:
    check_struct(btf, cls, cname)


@pytest.mark.parametrize("obj", [OBJ_SOCK, OBJ_SOCK_DESTROY])
@pytest.mark.parametrize("cls,cname", [(Lb4SockRevKey, "lb4_sock_rev_key"), (Lb4SockRevVal, "lb4_sock_rev_val"),
                                      (Lb6SockRevKey, "lb6_sock_rev_key"), (Lb6SockRevVal, "lb6_sock_rev_val")])
def test_socket_lb_struct_matches_btf(obj, cls, cname) -> None:
    with load_btf_from_elf(object_dir() / obj) as btf:
        check_struct(btf, cls, cname)


def check_struct(btf, cls, cname) -> None:
    layout = struct_layout(btf, cname)
    assert ctypes.sizeof(cls) == layout.size
    py_names = [f[0] for f in cls._fields_]
    assert py_names == [m.name for m in layout.members]
    for m in layout.members:
        assert bit_offset(cls, m.name) == (m.bit_offset, m.bit_size), m.name


def test_ct_flag_bits_in_order(btf) -> None:
    layout = struct_layout(btf, "ct_entry")
    lifetime_end = layout.member("lifetime").bit_offset + 32
    for i, (name, _) in enumerate(CT_FLAG_BITS):
        assert layout.member(name).bit_offset == lifetime_end + i


def test_reference_sizes() -> None:
    assert ctypes.sizeof(CtTuple4) == 14 and ctypes.sizeof(CtEntry) == 56


def test_reason_names_from_btf() -> None:
    names = reason_names(str(object_dir() / OBJ_LXC))
    assert names[0] == "PASS_CT_NEW"
    assert names[130] == "DROP_CT_INSERT_FAILED"
    assert all(n.startswith(("PASS_", "DROP_")) for n in names.values())


def test_lb_flag_values_match_btf(btf) -> None:
    svc = btf.enum_values("lb_svc_flag")
    assert svc == {"LB_SVC_F_EXTERNAL": abi.LB_SVC_F_EXTERNAL, "LB_SVC_F_NODEPORT": abi.LB_SVC_F_NODEPORT,
                   "LB_SVC_F_LOADBALANCER": abi.LB_SVC_F_LOADBALANCER,
                   "LB_SVC_F_AFFINITY": abi.LB_SVC_F_AFFINITY}
    assert btf.enum_values("lb_backend_flag") == {"LB_BACKEND_F_REMOTE": abi.LB_BACKEND_F_REMOTE}
