"""Every constant of the datapath ABI (tuplet.datapath.abi) against the built objects: names
of objects, programs and pinned maps against what the objects declare, and every integer
constant against the enumerator of the same name in the objects' BTF, so a change on
either side fails here rather than misreading a map."""
from __future__ import annotations

import ctypes
from functools import lru_cache

import pytest

from tuplet.bpf.btf import Kind, load_btf_from_elf
from tuplet.bpf.objects import ObjectSpec
from tuplet.datapath import abi, cttables
from tuplet.datapath.paths import object_dir

OBJECTS = (abi.OBJ_LXC, abi.OBJ_HOST, abi.OBJ_OVERLAY, abi.OBJ_SOCK, abi.OBJ_GC, abi.OBJ_GC_ITER,
           abi.OBJ_SOCK_DESTROY)


@lru_cache(maxsize=None)
def declared(obj: str) -> tuple[set[str], set[str]]:
    """(names of the maps it pins, program names) an object declares. Opening with a pin root
    only computes pin paths (nothing is created before a load)."""
    with ObjectSpec.open(object_dir() / obj, pin_root="/sys/fs/bpf/tuplet/abi-check") as spec:
        return {n for n, m in spec.maps.items() if m.pin_path}, set(spec.program_names)


@lru_cache(maxsize=None)
def enumerators(obj: str) -> dict[str, int]:
    """Every enumerator of every enum in the object's BTF."""
    with load_btf_from_elf(object_dir() / obj) as btf:
        out: dict[str, int] = {}
        for type_id in range(1, len(btf)):
            t = btf[type_id]
            if t.kind in (Kind.ENUM, Kind.ENUM64) and t.name:
                out.update(btf.enum_values(type_id))
        return out


def abi_constants(kind: type) -> dict[str, object]:
    return {k: v for k, v in vars(abi).items() if k.isupper() and isinstance(v, kind) and not isinstance(v, bool)}


def test_every_map_name_is_a_map_of_the_objects_and_every_pinned_map_is_named() -> None:
    names = {v for k, v in abi_constants(str).items() if k.endswith("_MAP") or k.startswith(("CT_MAP_", "CT6_MAP_"))}
    names |= set(abi.CT_MAPS) | set(abi.CT6_MAPS) | set(abi.LB_MAPS)
    maps = set().union(*(declared(o)[0] for o in OBJECTS))
    assert names - maps == set(), "abi names maps no object declares"
    assert maps - names == set(), "objects declare maps abi does not name"
    for name in names:   # the layout version is part of the name
        assert name.startswith("tpl_") and name.rsplit("_", 1)[-1][0] == "v", name


def test_program_names_are_in_their_objects() -> None:
    for obj, hooks in ((abi.OBJ_LXC, abi.LXC_HOOKS), (abi.OBJ_HOST, abi.NETDEV_HOOKS),
                       (abi.OBJ_OVERLAY, abi.OVERLAY_HOOKS), (abi.OBJ_SOCK, abi.SOCK_HOOKS)):
        assert {p for p, _ in hooks} <= declared(obj)[1], obj
    assert {abi.GC_PROGRAM, abi.GC_KEYS_PROGRAM, abi.NOTIFY_EMIT_PROGRAM} <= declared(abi.OBJ_GC)[1]
    assert set(abi.GC_ITER_PROGRAM.values()) <= declared(abi.OBJ_GC_ITER)[1]
    assert set(abi.GC_ITER_PROGRAM) == set(abi.CT_MAPS) | set(abi.CT6_MAPS)
    assert abi.SOCK_DESTROY_PROGRAM in declared(abi.OBJ_SOCK_DESTROY)[1]
    assert set(abi.GC_SELECTOR) == set(abi.CT_MAPS) | set(abi.CT6_MAPS)


@pytest.mark.parametrize("name", sorted(abi_constants(int)))
def test_integer_constant_matches_the_enumerator_in_btf(name: str) -> None:
    value = vars(abi)[name]
    found = {o: enumerators(o)[name] for o in OBJECTS if name in enumerators(o)}
    assert found, f"{name} is in no object's BTF: name it in an enum there (see bpf/lib/reasons.h)"
    assert set(found.values()) == {value}, f"{name}: abi has {value:#x}, BTF has {found}"


def test_the_ct_table_registry_names_every_ct_table_with_its_key_layout() -> None:
    """tuplet.datapath.cttables: every CT table of abi once, each with the key size the
    object declares and a twin of the same class in the other family."""
    assert set(cttables.NAMES) == set(abi.CT_MAPS) | set(abi.CT6_MAPS) and len(cttables.NAMES) == 6
    with ObjectSpec.open(object_dir() / abi.OBJ_LXC) as spec:
        for t in cttables.CT_TABLES:
            assert spec.maps[t.name].key_size == t.key_size == len(abi.ct_sentinel_key(0, t.key_size)), t.name
            assert t.twin.proto is t.proto and t.twin.family is not t.family and t.twin.twin is t
            assert t.name in abi.GC_SELECTOR and t.name in abi.GC_ITER_PROGRAM


def test_the_registry_names_each_ct_tables_nat_table() -> None:
    """Every NAT table of abi once, with the key and value sizes the object declares; each CT
    table's NAT table is its family's, and GC can count every one."""
    assert cttables.NAT_NAMES == (abi.NAT_MAP, abi.NAT6_MAP)
    assert set(abi.GC_NAT_SELECTOR) == set(cttables.NAT_NAMES)
    with ObjectSpec.open(object_dir() / abi.OBJ_LXC) as spec:
        for n in cttables.NAT_TABLES:
            m = spec.maps[n.name]
            assert (m.key_size, m.value_size) == (ctypes.sizeof(n.key), n.value_size), n.name
            assert set(cttables.owners(n.name)) == set(cttables.names(n.family)), n.name
            assert cttables.sized_as(n.name) == abi.NAT_MAP and cttables.family_of(n.name) is n.family
    for t in cttables.CT_TABLES:
        assert cttables.nat_table(t.nat).family is t.family and cttables.nat_table(t.nat).key is t.key, t.name
