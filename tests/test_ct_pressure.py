"""Table pressure on the real programs (BPF_PROG_TEST_RUN): a SYN flood at ten times the
TCP table's size cannot evict established connections when new TCP entries wait in the
handshake table (`ct_syn_table`, the default), and does with one LRU table (the reference's
layout), which shows the protection is what keeps them. Also: when an entry is promoted,
and what stays behind."""
from __future__ import annotations

import random
import struct

import pytest

from lxc_harness import LxcHarness, tcp
from tuplet.datapath import abi
from tuplet.datapath.abi import CT_MAP_ANY, CT_MAP_SYN, CT_MAP_TCP, TUPLE_F_IN, TUPLE_F_OUT

POD1, POD2 = "10.64.0.36", "10.64.0.64"
TCP_MAX, SYN_MAX = 4096, 1024
K = 1000                      # established connections
FLOOD = 10 * TCP_MAX          # SYNs from random sources


def load(syn_table: bool) -> LxcHarness:
    h = LxcHarness.load(consts={"ct_syn_table": int(syn_table), "ct_accounting": 1})
    h.add_endpoint(POD1, 3096)
    h.add_endpoint(POD2, 4000)
    return h


@pytest.fixture(params=[True, False], ids=["syn-table", "single-lru"])
def harness(request):
    h = load(request.param)
    yield request.param, h
    h.close()


def handshake(h: LxcHarness, sport: int) -> None:
    """pod1 -> pod2:80 as seen on pod1's veth: SYN out, SYN-ACK in, ACK out."""
    assert h.egress(tcp(POD1, sport, POD2, 80, "S")).reason == "PASS_CT_NEW"
    assert h.ingress(tcp(POD2, 80, POD1, sport, "SA")).reason == "PASS_CT_REPLY"
    assert h.egress(tcp(POD1, sport, POD2, 80, "A")).reason == "PASS_CT_ESTABLISHED"


def out_key(sport: int) -> tuple:
    return (POD1, POD2, 80, sport, 6, TUPLE_F_OUT)


def flood(h: LxcHarness, n: int, seed: int = 7) -> None:
    """n SYNs to pod2:80 from random sources in 172.16.0.0/12 and random ports, sent by
    pod1's veth (each one a new flow). Patched into one template: the programs do not
    check checksums (test runs are CHECKSUM_NONE)."""
    rnd = random.Random(seed)
    prog = h.coll.programs["cil_from_container"]
    tmpl = bytearray(tcp("172.16.0.1", 1, POD2, 80, "S"))
    for _ in range(n):
        struct.pack_into("!I", tmpl, 26, 0xAC100000 | rnd.getrandbits(20))   # IPv4 source
        struct.pack_into("!H", tmpl, 34, 1024 + rnd.getrandbits(15))         # TCP source port
        assert prog.test_run(bytes(tmpl)).retval == 0


def test_flood_evicts_established_entries_only_without_the_handshake_table(harness) -> None:
    syn_table, h = harness
    for i in range(K):
        handshake(h, 20000 + i)
    tcp_map = h.coll.maps[CT_MAP_TCP]
    assert all(h.table_of(*out_key(20000 + i)) == CT_MAP_TCP for i in range(K))
    related_before = h.coll.maps[CT_MAP_ANY].count()

    flood(h, FLOOD)

    kept = sum(1 for i in range(K) if h.table_of(*out_key(20000 + i)) == CT_MAP_TCP)
    if syn_table:
        # Every established entry is there and its next packet is established, not new.
        assert kept == K
        assert tcp_map.count() == K
        assert h.coll.maps[CT_MAP_SYN].count() >= 0.75 * SYN_MAX       # the flood filled only this (an LRU on 2 CPUs evicts from ~80%)
        assert h.coll.maps[CT_MAP_ANY].count() == related_before         # no related twin per SYN
        for i in range(0, K, 50):
            assert h.egress(tcp(POD1, 20000 + i, POD2, 80, "A", b"x")).reason == "PASS_CT_ESTABLISHED"
    else:
        # One LRU table: the flood evicted established connections (about half here: the
        # kernel's LRU evicts never-referenced entries first, but not only those). Their
        # next packet is taken for a new flow (state, counters and flags lost).
        assert kept <= 0.75 * K, kept
        lost = [i for i in range(K) if h.table_of(*out_key(20000 + i)) is None]
        assert h.egress(tcp(POD1, 20000 + lost[0], POD2, 80, "A", b"x")).reason == "PASS_CT_NEW"


def test_promotion_on_the_third_packet_with_the_related_twin() -> None:
    h = load(True)
    try:
        assert h.egress(tcp(POD1, 30000, POD2, 80, "S")).reason == "PASS_CT_NEW"
        assert h.table_of(*out_key(30000)) == CT_MAP_SYN
        assert not [r for r in h.entries() if r.related]          # the twin waits for promotion
        h.ingress(tcp(POD2, 80, POD1, 30000, "SA"))
        assert h.table_of(*out_key(30000)) == CT_MAP_SYN           # a reply alone: not yet
        h.egress(tcp(POD1, 30000, POD2, 80, "A"))
        assert h.table_of(*out_key(30000)) == CT_MAP_TCP
        e = h.entry(*out_key(30000))
        assert e is not None and e.seen_non_syn and e.packets == 3
        assert e.tx_flags_seen & 0x12 == 0x12 and e.rx_flags_seen & 0x12 == 0x12
        rel = [r for r in h.entries() if r.related]
        assert len(rel) == 1 and rel[0].direction == "OUT" and rel[0].entry.src_sec_id == 3096
    finally:
        h.close()


def test_what_stays_in_the_handshake_table() -> None:
    h = load(True)
    try:
        # SYN retransmits and ACKs without any reply (a spoofed flood's shape) never promote.
        for flags in ("S", "S", "A", "A"):
            h.egress(tcp(POD1, 30001, POD2, 80, flags))
        assert h.table_of(*out_key(30001)) == CT_MAP_SYN
        # RST during the handshake: closed where it is.
        h.egress(tcp(POD1, 30002, POD2, 80, "S"))
        h.ingress(tcp(POD2, 80, POD1, 30002, "R"))
        h.egress(tcp(POD1, 30002, POD2, 80, "A"))
        assert h.table_of(*out_key(30002)) == CT_MAP_SYN
        # A connection picked up mid-stream (no SYN seen) is promoted on its first reply.
        picked = (POD2, POD1, 30003, 8080, 6, TUPLE_F_IN)     # flow pod2:8080 -> pod1:30003
        h.ingress(tcp(POD2, 8080, POD1, 30003, "A", b"data"))
        assert h.table_of(*picked) == CT_MAP_SYN
        h.egress(tcp(POD1, 30003, POD2, 8080, "A"))
        assert h.table_of(*picked) == CT_MAP_TCP
        # UDP is not affected.
        assert h.coll.maps[CT_MAP_SYN].count() == 2
    finally:
        h.close()


def test_event_counters_account_for_every_table_change() -> None:
    from tuplet.datapath import events as ct_events
    from tuplet.datapath.abi import OBJ_LXC
    from tuplet.datapath.paths import object_dir

    h = load(True)
    try:
        names = ct_events.event_names(str(object_dir() / OBJ_LXC))
        assert set(names.values()) >= {"insert_tcp", "insert_syn", "insert_any", "promoted",
                                       "promote_failed", "insert_failed"}
        for i in range(5):
            handshake(h, 40000 + i)               # 5 SYN inserts, 5 promotions, 1 related twin
        flood(h, 3 * SYN_MAX, seed=11)            # the handshake table overflows
        h.egress(tcp(POD1, 5353, POD2, 53, "S"))  # one more in the handshake table
        ev = ct_events.read(h.coll.maps[abi.EVENTS_MAP], names)
        assert ev["promoted"] == 5 and ev["insert_tcp"] == 5 and ev["insert_any"] == 1
        assert ev["insert_syn"] == 5 + 3 * SYN_MAX + 1
        assert ev["promote_failed"] == 0 and ev["insert_failed"] == 0
        # What left the handshake table other than by promotion was evicted by the LRU.
        evicted = ev["insert_syn"] - ev["promoted"] - h.coll.maps[CT_MAP_SYN].count()
        assert evicted >= 3 * SYN_MAX - SYN_MAX
    finally:
        h.close()
