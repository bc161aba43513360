"""Garbage collection against real CT maps filled by the programs themselves."""
from __future__ import annotations

import ctypes
import os
import socket

import numpy as np
import pytest

from lxc_harness import LxcHarness, tcp, udp
from tuplet.bpf.maps import Map
from tuplet.conntrack.entries import EntryLayout, nat_keys_for
from tuplet.conntrack.gc import CtGc, Method, gc_pass
from tuplet.core.errors import TupletError
from tuplet.datapath import cttables
from tuplet.datapath.abi import (
    CT6_MAP_ANY,
    CT6_MAP_SYN,
    CT6_MAP_TCP,
    CT6_MAPS,
    CT_MAP_ANY,
    CT_MAP_SYN,
    CT_MAP_TCP,
    NAT_MAP,
    TUPLE_F_IN,
    TUPLE_F_OUT,
    TUPLE_F_RELATED,
    TUPLE_F_SERVICE,
)
from tuplet.datapath.cttables import Family, Proto
from tuplet.datapath.layouts import CtEntry, CtTuple4, CtTuple6, Nat4Entry

pytestmark = pytest.mark.clock   # again with a near-zero clock in `make test`

A, B = "10.64.0.36", "10.64.0.64"
CLIENT, VIP = "192.0.2.10", "172.16.0.10"
METHODS = [Method.KERNEL, Method.BATCH]


@pytest.fixture(autouse=True)
def _needs_iterators(request: pytest.FixtureRequest, lxc: LxcHarness) -> None:
    """Skip the kernel method's cases where this kernel refuses iter/bpf_map_elem programs."""
    if request.node.callspec.params.get("method") if hasattr(request.node, "callspec") else None:
        if request.node.callspec.params["method"] is Method.KERNEL and not iterators_work(lxc):
            pytest.skip("this kernel refuses iter/bpf_map_elem programs (the batch method covers it)")


def iterators_work(h: LxcHarness) -> bool:
    try:
        CtGc([h.coll.maps[CT_MAP_TCP]], method=Method.KERNEL).close()
        return True
    except TupletError:
        return False


def established(h: LxcHarness, sport: int) -> None:
    h.egress(tcp(A, sport, B, 80, "S"))
    h.ingress(tcp(B, 80, A, sport, "SA"))
    h.egress(tcp(A, sport, B, 80, "A"))


def closed(h: LxcHarness, sport: int) -> None:
    established(h, sport)
    h.egress(tcp(A, sport, B, 80, "FA"))
    h.ingress(tcp(B, 80, A, sport, "FA"))


def maps(h: LxcHarness) -> list[Map]:
    return [h.coll.maps[CT_MAP_TCP], h.coll.maps[CT_MAP_ANY], h.coll.maps[CT_MAP_SYN]]


def keys(h: LxcHarness) -> set[str]:
    return {r.line().split(" expires=")[0] for r in h.entries()}


@pytest.mark.parametrize("method", METHODS)
def test_pass_deletes_exactly_the_expired(lxc: LxcHarness, method: Method) -> None:
    established(lxc, 1000)           # TCP OUT, 8000 s; related ICMP 60 s
    closed(lxc, 1001)                # TCP OUT closing, 10 s; related ICMP 60 s
    lxc.egress(tcp(A, 1002, B, 80, "S"))   # SYN only, 60 s (in the handshake table)
    lxc.egress(udp(A, 5000, B, 53))  # UDP 60 s; related ICMP (same pair: refreshed)
    before = keys(lxc)
    now = lxc.now()

    r = gc_pass(maps(lxc), method=method, now=now + 30)
    assert [(s.map, s.deleted) for s in r.maps] == [(CT_MAP_TCP, 1), (CT_MAP_ANY, 0), (CT_MAP_SYN, 0)]
    assert before - keys(lxc) == {f"TCP OUT {A}:1001 -> {B}:80"}

    r = gc_pass(maps(lxc), method=method, now=now + 100)
    assert keys(lxc) == {f"TCP OUT {A}:1000 -> {B}:80"}
    assert [s.deleted for s in r.maps] == [0, 2, 1]   # UDP + related; the SYN entry
    assert r.alive == 1 and r.duration > 0

    r = gc_pass(maps(lxc), method=method, now=now + 100)
    assert r.deleted == 0 and r.alive == 1


A6, B6 = "f00d::24", "f00d::40"
CLIENT6, VIP6 = "2001:db8::10", "fd00:10::10"
#: Per family: (pod A, pod B, client, VIP) and the protocol of a related ICMP entry.
ADDRS = {Family.IPV4: (A, B, CLIENT, VIP), Family.IPV6: (A6, B6, CLIENT6, VIP6)}
ICMP = {Family.IPV4: 1, Family.IPV6: 58}
FAMILIES = [Family.IPV4, Family.IPV6]


def ct_table(fam: Family, proto: Proto) -> cttables.CtTable:
    return cttables.table(cttables.names(fam, (proto,))[0])


def nat_for(key: CtTuple4 | CtTuple6) -> CtTuple4 | CtTuple6:
    """The NAT key a NAT-owning entry owns: the reply the backend sends, from the entry's
    original destination to its original source (nat_map.h's nat{4,6}_key_for_ct)."""
    return type(key)(daddr=key.daddr, saddr=key.saddr, dport=key.sport, sport=key.dport,
                     nexthdr=key.nexthdr, flags=TUPLE_F_OUT)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_entry_kind_and_the_nat_entries_they_own(lxc: LxcHarness, method: Method, family: Family) -> None:
    """Expired/alive x OUT, IN, related, service, DSR and NodePort entries; NAT tied to owners,
    each family's in its own NAT table (the other family's untouched)."""
    tcp_t, any_t = ct_table(family, Proto.TCP), ct_table(family, Proto.ANY)
    tcp_map, any_map = lxc.coll.maps[tcp_t.name], lxc.coll.maps[any_t.name]
    nat, nat_value = lxc.coll.maps[tcp_t.nat], cttables.nat_table(tcp_t.nat).value
    other = lxc.coll.maps[next(n for n in cttables.NAT_NAMES if n != tcp_t.nat)]
    a, b, client, vip = ADDRS[family]
    make = tcp_t.key.make
    now = lxc.now()

    def put(m, key: CtTuple4 | CtTuple6, alive: bool, **flags) -> None:
        m.update(key, CtEntry(lifetime=now + 100 if alive else now - 1, **flags))

    kinds = {
        "out": (tcp_map, make(a, b, 80, 1000, 6, TUPLE_F_OUT), {}),
        "in": (tcp_map, make(a, b, 80, 1001, 6, TUPLE_F_IN), {}),
        "svc": (tcp_map, make(a, vip, 80, 1002, 6, TUPLE_F_SERVICE), {"backend_id": 7}),
        "related": (any_map, make(a, b, 0, 0, ICMP[family], TUPLE_F_OUT | TUPLE_F_RELATED), {}),
        "udp": (any_map, make(a, b, 53, 1003, 17, TUPLE_F_OUT), {}),
        # NAT owners as the datapath makes them: the client's flow to the backend A (OUT client -> A).
        "dsr": (tcp_map, make(client, a, 8080, 40000, 6, TUPLE_F_OUT), {"dsr_internal": 1}),
        "dsr_udp": (any_map, make(client, a, 5353, 40010, 17, TUPLE_F_OUT), {"dsr_internal": 1}),
        "nodeport": (tcp_map, make(client, a, 8080, 40020, 6, TUPLE_F_OUT), {"node_port": 1}),
        # An ingress entry with the flag does not own a NAT entry.
        "in_flagged": (tcp_map, make(client, a, 8080, 40030, 6, TUPLE_F_IN), {"dsr_internal": 1}),
    }
    owners = ("dsr", "dsr_udp", "nodeport", "in_flagged")
    for alive in (False, True):
        for name, (m, key, flags) in kinds.items():
            k = type(key).from_buffer_copy(bytes(key))
            if alive:
                k.sport ^= 0x100     # a second, distinct flow of the same kind
            put(m, k, alive, **flags)
            if name in owners:
                nat.update(nat_for(k), nat_value(to_port=socket.htons(80)))
    orphan = make(b, client, 1, 2, 6, TUPLE_F_OUT)
    nat.update(orphan, nat_value())
    other_keys = {bytes(k) for k in other.keys()}

    r = gc_pass([tcp_map, any_map], nat=[lxc.coll.maps[n] for n in cttables.NAT_NAMES], method=method, now=now)
    assert r.method == method.value
    per_map = {s.map: (s.deleted, s.alive, s.nat_deleted) for s in r.maps}
    assert per_map == {tcp_t.name: (6, 6, 2), any_t.name: (3, 3, 1)}
    assert r.nat_deleted == 3 and r.nat_deleted_in(tcp_t.nat) == 3
    left = {bytes(k) for k in nat.keys()}
    for name, (m, key, flags) in kinds.items():
        assert m.lookup(key) is None, name                  # the expired one
        alive = type(key).from_buffer_copy(bytes(key))
        alive.sport ^= 0x100
        assert m.lookup(alive) is not None, name
        if name in owners:
            assert bytes(nat_for(alive)) in left, name
            assert (bytes(nat_for(key)) in left) == (name == "in_flagged"), name
    assert bytes(orphan) in left and len(left) == 6
    assert {bytes(k) for k in other.keys()} == other_keys


@pytest.mark.parametrize("family", FAMILIES)
def test_nat_key_matches_the_datapath_helper(lxc: LxcHarness, family: Family) -> None:
    """The numpy NAT key derivation and the BPF one (nat{4,6}_key_for_ct) agree."""
    t = ct_table(family, Proto.TCP)
    m, nat = lxc.coll.maps[t.name], lxc.coll.maps[t.nat]
    a, _, client, _ = ADDRS[family]
    lay = EntryLayout.of(m)
    now = lxc.now()
    keys = [t.key.make(a, client, 40000 + i, 8080, 6, TUPLE_F_OUT) for i in range(50)]
    for k in keys:
        m.update(k, CtEntry(lifetime=now - 1, dsr_internal=1))
    want = nat_keys_for(np.frombuffer(b"".join(bytes(k) for k in keys), lay.key),
                        np.frombuffer(b"".join(bytes(CtEntry(dsr_internal=1)) for _ in keys), lay.value), lay)
    assert want.tobytes() == b"".join(bytes(nat_for(k)) for k in keys)
    for w in want:
        nat.update(w.tobytes(), cttables.nat_table(t.nat).value())
    r = gc_pass([m], nat=nat, now=now)
    assert r.nat_deleted == 50 and nat.count() == 0


def test_entry_refreshed_between_read_and_delete_survives(lxc: LxcHarness, monkeypatch) -> None:
    lxc.egress(tcp(A, 2000, B, 80, "S"))     # 60 s
    lxc.egress(tcp(A, 2001, B, 80, "S"))     # 60 s, stays idle
    gc_now = lxc.now() + 61
    tcp_map = lxc.coll.maps[CT_MAP_SYN]       # not established: both wait in the handshake table
    real = Map.lookup_batch
    calls = []

    def lookup_then_traffic(self, buf, start):
        out = real(self, buf, start)
        calls.append(start)
        if self is tcp_map and len(calls) == 1:
            # The datapath sees the handshake complete after GC read the batch.
            lxc.advance(61)
            lxc.egress(tcp(A, 2000, B, 80, "A"))
        return out

    monkeypatch.setattr(Map, "lookup_batch", lookup_then_traffic)
    r = gc_pass([tcp_map], method=Method.BATCH, now=gc_now)
    s = r.maps[0]
    assert (s.deleted, s.kept_refreshed, s.alive) == (1, 1, 1)
    assert lxc.entry(A, B, 80, 2000, 6, 0) is not None
    assert lxc.entry(A, B, 80, 2001, 6, 0) is None


def test_small_chunks_grow_on_enospc(lxc: LxcHarness) -> None:
    m = lxc.coll.maps[CT_MAP_TCP]
    now = lxc.now()
    for i in range(3000):
        m.update(CtTuple4.make(A, B, 80, i, 6, 0), CtEntry(lifetime=now - 1 if i % 3 == 0 else now + 100))
    r = gc_pass([m], method=Method.BATCH, now=now, chunk=1)
    assert (r.maps[0].deleted, r.maps[0].alive) == (1000, 2000)
    assert m.count() == 2000


def test_gc_refuses_a_map_without_lifetime() -> None:
    h = LxcHarness.load()
    try:
        with pytest.raises(Exception, match="lifetime|layout"):
            gc_pass([h.coll.maps["tpl_ep4_v1"]])
    finally:
        h.close()


def test_gc_refuses_unknown_maps(lxc: LxcHarness) -> None:
    from tuplet.bpf import _libbpf as C
    from tuplet.bpf.libbpf import opts
    from tuplet.bpf.maps import Map as M
    src = lxc.coll.maps[CT_MAP_TCP]
    # A map with the same layout and BTF but a name the in-kernel pass does not know.
    btf_fd = C.bpf_btf_get_fd_by_id(src.info.btf_id)
    assert btf_fd >= 0
    o = opts(C.bpf_map_create_opts, btf_fd=btf_fd, btf_key_type_id=src.info.btf_key_type_id,
             btf_value_type_id=src.info.btf_value_type_id)
    fd = C.bpf_map_create(src.info.type, b"other_ct", src.key_size, src.value_size, 1024, ctypes.byref(o))
    os.close(btf_fd)
    assert fd >= 0
    with M(fd, "other_ct") as other:
        for method in (Method.KERNEL, Method.BATCH, Method.AUTO):   # every delete is in the kernel
            with pytest.raises(TupletError, match="GC knows only"):
                CtGc([other], method=method)


def test_kernel_pass_reuses_the_datapath_maps(lxc: LxcHarness) -> None:
    """The GC program works on the very maps the datapath writes, not on copies."""
    established(lxc, 3000)
    m = lxc.coll.maps[CT_MAP_TCP]
    with CtGc([m, lxc.coll.maps[CT_MAP_ANY]]) as g:
        r1 = g.run(now=lxc.now())
        assert r1.deleted == 0 and r1.maps[0].alive == 1
        r2 = g.run(now=lxc.now() + 9000)
        assert r2.maps[0].deleted == 1 and m.count() == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("now", [(1 << 32) - 20, 5], ids=["before-wrap", "after-wrap"])
def test_expiry_is_judged_across_the_u32_wrap(lxc: LxcHarness, method: Method, now: int) -> None:
    """Lifetimes straddling the u32 wrap: 30 s ahead of now alive and 1..15 s behind
    expired, whichever side of 2^32 either lies (a plain < on the raw values deletes the
    live ones before the wrap and keeps the dead ones after it)."""
    m = lxc.coll.maps[CT_MAP_TCP]
    ahead = {i: (now + 30 + i) % (1 << 32) for i in range(1, 16)}
    behind = {100 + i: (now - i) % (1 << 32) for i in range(1, 16)}
    for sport, lifetime in {**ahead, **behind}.items():
        m.update(CtTuple4.make(A, B, 80, sport, 6, 0), CtEntry(lifetime=lifetime))
    with CtGc([m], method=method) as g:
        r = g.run(now=now)
    left = {CtTuple4.from_buffer_copy(k).sport for k in m.keys()}
    assert r.maps[0].deleted == len(behind) and r.maps[0].alive == len(ahead)
    assert left == {socket.htons(p) for p in ahead}


@pytest.mark.parametrize("method", METHODS)
def test_ipv6_tables_are_collected_like_the_ipv4_ones(lxc: LxcHarness, method: Method) -> None:
    """Expired and alive entries in each IPv6 table, beside IPv4 ones, in one pass with the
    NAT table: exactly the expired go, in both families, and no NAT entry is touched (none
    of these entries owns the one there)."""
    now = lxc.now()
    nat = lxc.coll.maps[NAT_MAP]
    nat.update(CtTuple4.make(B, CLIENT, 1, 2, 6, TUPLE_F_OUT), Nat4Entry())
    for name, proto in ((CT6_MAP_TCP, 6), (CT6_MAP_ANY, 17), (CT6_MAP_SYN, 6), (CT_MAP_TCP, 6)):
        m = lxc.coll.maps[name]
        for sport in range(1, 301):   # a third expired: several runs of the deleter
            tup = CtTuple6.make(A6, B6, 80, sport, proto, TUPLE_F_OUT) if name in CT6_MAPS \
                else CtTuple4.make(A, B, 80, sport, proto, TUPLE_F_OUT)
            m.update(tup, CtEntry(lifetime=now - 1 if sport % 3 == 0 else now + 100, dsr_internal=1))
    ct = [lxc.coll.maps[n] for n in (*CT6_MAPS, CT_MAP_TCP)]
    r = gc_pass(ct, nat=nat, method=method, now=now)
    assert [(s.map, s.deleted, s.alive) for s in r.maps] == [(n, 100, 200) for n in (*CT6_MAPS, CT_MAP_TCP)]
    assert r.nat_deleted == 0 and nat.count() == 1
    for name in CT6_MAPS:
        left = {socket.ntohs(CtTuple6.from_buffer_copy(k).sport) for k in lxc.coll.maps[name].keys()}
        assert left == {p for p in range(1, 301) if p % 3}, name
    assert gc_pass(ct, nat=nat, method=method, now=now).deleted == 0


def test_ipv6_refreshed_between_read_and_delete_survives(lxc: LxcHarness, monkeypatch) -> None:
    """The IPv6 deleter re-checks the lifetime as its last step, as the IPv4 one."""
    m = lxc.coll.maps[CT6_MAP_ANY]
    now = lxc.now()
    for sport in (1, 2):
        m.update(CtTuple6.make(A6, B6, 53, sport, 17, TUPLE_F_OUT), CtEntry(lifetime=now - 1))
    real = Map.lookup_batch

    def lookup_then_refresh(self, buf, start):
        out = real(self, buf, start)
        if self is m:
            m.update(CtTuple6.make(A6, B6, 53, 1, 17, TUPLE_F_OUT), CtEntry(lifetime=now + 100))
        return out

    monkeypatch.setattr(Map, "lookup_batch", lookup_then_refresh)
    s = gc_pass([m], method=Method.BATCH, now=now).maps[0]
    assert (s.deleted, s.kept_refreshed) == (1, 1)
    assert [socket.ntohs(CtTuple6.from_buffer_copy(k).sport) for k in m.keys()] == [1]


def test_both_nat_tables_are_counted(lxc: LxcHarness) -> None:
    """count_nat counts each NAT table given (batch lookups), and the one-run walk counts
    either one by its selector (GC_MAP_NAT, GC_MAP_NAT6)."""
    now = lxc.now()
    for name, many in zip(cttables.NAT_NAMES, (3, 7)):
        t = cttables.nat_table(name)
        a, b = ADDRS[t.family][:2]
        for i in range(many):
            lxc.coll.maps[name].update(t.key.make(a, b, 80, 1000 + i, 6, TUPLE_F_OUT), t.value())
    nats = [lxc.coll.maps[n] for n in cttables.NAT_NAMES]
    with CtGc([lxc.coll.maps[CT_MAP_TCP]], nat=nats, count_nat=True, method=Method.BATCH) as g:
        r = g.run(now=now)
        assert [g.walk_only(m) for m in nats] == [3, 7]
    assert [(c.map, c.entries, c.max_entries) for c in r.nat_counts] == [
        (m.name, n, m.max_entries) for m, n in zip(nats, (3, 7))]
    assert r.fill()[cttables.NAT_NAMES[1]] == 7 / nats[1].max_entries


def test_gc_refuses_a_nat_map_that_is_not_one(lxc: LxcHarness) -> None:
    with pytest.raises(TupletError, match="not a NAT table"):
        CtGc([lxc.coll.maps[CT_MAP_TCP]], nat=lxc.coll.maps[CT_MAP_ANY], method=Method.BATCH)
