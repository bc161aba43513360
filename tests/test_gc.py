"""Garbage collection against real CT maps filled by the programs themselves."""
from __future__ import annotations

import pytest

from lxc_harness import LxcHarness, tcp, udp
from tuplet.ct import CT_MAP_ANY, CT_MAP_TCP
from tuplet.gc import gc_pass
from tuplet.layouts import CtEntry, CtTuple4
from tuplet.maps import Map

A, B = "10.64.0.36", "10.64.0.64"


def established(h: LxcHarness, sport: int) -> None:
    h.egress(tcp(A, sport, B, 80, "S"))
    h.ingress(tcp(B, 80, A, sport, "SA"))
    h.egress(tcp(A, sport, B, 80, "A"))


def closed(h: LxcHarness, sport: int) -> None:
    established(h, sport)
    h.egress(tcp(A, sport, B, 80, "FA"))
    h.ingress(tcp(B, 80, A, sport, "FA"))


def maps(h: LxcHarness) -> list[Map]:
    return [h.coll.maps[CT_MAP_TCP], h.coll.maps[CT_MAP_ANY]]


def keys(h: LxcHarness) -> set[str]:
    return {r.line().split(" expires=")[0] for r in h.entries()}


def test_pass_deletes_exactly_the_expired(lxc: LxcHarness) -> None:
    established(lxc, 1000)           # TCP OUT, 8000 s; related ICMP 60 s
    closed(lxc, 1001)                # TCP OUT closing, 10 s; related ICMP 60 s
    lxc.egress(tcp(A, 1002, B, 80, "S"))   # SYN only, 60 s
    lxc.egress(udp(A, 5000, B, 53))  # UDP 60 s; related ICMP (same pair: refreshed)
    before = keys(lxc)
    now = lxc.now()

    r = gc_pass(maps(lxc), now=now + 30)
    assert [(s.map, s.deleted) for s in r.maps] == [(CT_MAP_TCP, 1), (CT_MAP_ANY, 0)]
    assert before - keys(lxc) == {f"TCP OUT {A}:1001 -> {B}:80"}

    r = gc_pass(maps(lxc), now=now + 100)
    assert keys(lxc) == {f"TCP OUT {A}:1000 -> {B}:80"}
    assert r.maps[0].deleted == 1 and r.maps[1].deleted == 2   # SYN entry; UDP + related
    assert r.alive == 1 and r.duration > 0

    r = gc_pass(maps(lxc), now=now + 100)
    assert r.deleted == 0 and r.alive == 1


def test_entry_refreshed_between_read_and_delete_survives(lxc: LxcHarness, monkeypatch) -> None:
    lxc.egress(tcp(A, 2000, B, 80, "S"))     # 60 s
    lxc.egress(tcp(A, 2001, B, 80, "S"))     # 60 s, stays idle
    gc_now = lxc.now() + 61
    tcp_map = lxc.coll.maps[CT_MAP_TCP]
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
    r = gc_pass([tcp_map], now=gc_now)
    s = r.maps[0]
    assert (s.deleted, s.kept_refreshed, s.alive) == (1, 1, 1)
    assert lxc.entry(A, B, 80, 2000, 6, 0) is not None
    assert lxc.entry(A, B, 80, 2001, 6, 0) is None


def test_small_chunks_grow_on_enospc(lxc: LxcHarness) -> None:
    m = lxc.coll.maps[CT_MAP_TCP]
    now = lxc.now()
    for i in range(3000):
        m.update(CtTuple4.make(A, B, 80, i, 6, 0), CtEntry(lifetime=now - 1 if i % 3 == 0 else now + 100))
    r = gc_pass([m], now=now, chunk=1)
    assert (r.maps[0].deleted, r.maps[0].alive) == (1000, 2000)
    assert m.count() == 2000


def test_gc_refuses_a_map_without_lifetime() -> None:
    h = LxcHarness.load()
    try:
        with pytest.raises(Exception, match="lifetime|layout"):
            gc_pass([h.coll.maps["tpl_ep4_v1"]])
    finally:
        h.close()
