"""The `ct list`/`ct delete` filter (tuplet.conntrack.ctfilter) over real CT maps: entries
written with known fields, and entries the programs created from packets."""
from __future__ import annotations

import ipaddress

import pytest

from lxc_harness import LxcHarness, tcp, udp
from tuplet.conntrack import listing
from tuplet.conntrack.ctfilter import CtFilter, FilterLayout, parse_net, parse_port, parse_proto
from tuplet.conntrack.flush import Flusher
from tuplet.core.errors import ConfigError
from tuplet.datapath import cttables
from tuplet.datapath.abi import (
    CT6_MAP_ANY,
    CT6_MAP_SYN,
    CT6_MAP_TCP,
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

A, B, C = "10.64.0.36", "10.64.0.64", "10.65.1.7"
VIP = "172.16.0.10"
A6, B6, C6 = "f00d::24", "f00d::40", "fd00:1::7"


def put(h: LxcHarness, table: str, src: str, sport: int, dst: str, dport: int, proto: int, flags: int,
        **entry: int) -> None:
    """An entry for the flow src:sport -> dst:dport (the key names the reply's addresses)."""
    e = CtEntry(lifetime=h.now() + 100, **entry)
    key = (CtTuple6 if ":" in src else CtTuple4).make(src, dst, dport, sport, proto, flags)
    h.coll.maps[table].update(key, e)


@pytest.fixture
def filled(lxc: LxcHarness) -> LxcHarness:
    put(lxc, CT_MAP_TCP, A, 1000, B, 80, 6, TUPLE_F_OUT, seen_non_syn=1)                # established
    put(lxc, CT_MAP_TCP, A, 1000, B, 80, 6, TUPLE_F_IN, seen_non_syn=1)
    put(lxc, CT_MAP_TCP, A, 1001, B, 80, 6, TUPLE_F_OUT, seen_non_syn=1, tx_closing=1)  # closing
    put(lxc, CT_MAP_SYN, C, 2000, B, 443, 6, TUPLE_F_OUT)                               # syn
    put(lxc, CT_MAP_TCP, A, 3000, VIP, 80, 6, TUPLE_F_SERVICE, seen_non_syn=1, rev_nat_index=7)
    put(lxc, CT_MAP_TCP, A, 3000, B, 8080, 6, TUPLE_F_OUT, seen_non_syn=1, rev_nat_index=7)
    put(lxc, CT_MAP_ANY, A, 5353, C, 53, 17, TUPLE_F_OUT)
    put(lxc, CT_MAP_ANY, A, 1000, B, 80, 1, TUPLE_F_OUT | TUPLE_F_RELATED)
    return lxc


def flows(h: LxcHarness, flt: CtFilter, tables=(CT_MAP_TCP, CT_MAP_SYN, CT_MAP_ANY)) -> set[str]:
    out = set()
    for t in tables:
        for chunk in listing.matching(h.coll.maps[t], flt, chunk=2):   # several chunks per table
            out |= {r.line().split(" expires=")[0] for r in chunk.records()}
    return out


def test_each_filter_selects_exactly_its_entries(filled: LxcHarness) -> None:
    everything = flows(filled, CtFilter())
    assert len(everything) == 8
    assert flows(filled, CtFilter(src=ipaddress.IPv4Network("10.65.0.0/16"))) == {
        f"TCP OUT {C}:2000 -> {B}:443"}
    assert flows(filled, CtFilter(dst=parse_net("-d", C))) == {f"UDP OUT {A}:5353 -> {C}:53"}
    assert flows(filled, CtFilter(proto=1)) == {f"ICMP OUT {A}:1000 -> {B}:80 related"}
    assert flows(filled, CtFilter(sport=1000, proto=6)) == {f"TCP OUT {A}:1000 -> {B}:80",
                                                             f"TCP IN {A}:1000 -> {B}:80"}
    assert flows(filled, CtFilter(dport=8080)) == {f"TCP OUT {A}:3000 -> {B}:8080"}
    assert flows(filled, CtFilter(type="IN")) == {f"TCP IN {A}:1000 -> {B}:80"}
    assert flows(filled, CtFilter(type="SVC")) == {f"TCP SVC {A}:3000 -> {VIP}:80"}
    assert flows(filled, CtFilter(state="syn")) == {f"TCP OUT {C}:2000 -> {B}:443"}
    assert flows(filled, CtFilter(state="closing")) == {f"TCP OUT {A}:1001 -> {B}:80"}
    assert len(flows(filled, CtFilter(state="established"))) == 4
    assert flows(filled, CtFilter(rev_nat=7)) == {f"TCP SVC {A}:3000 -> {VIP}:80",
                                                  f"TCP OUT {A}:3000 -> {B}:8080"}
    assert flows(filled, CtFilter(addrs=(C,))) == {f"TCP OUT {C}:2000 -> {B}:443",
                                                   f"UDP OUT {A}:5353 -> {C}:53"}
    # conditions combine (AND), and a combination nothing has selects nothing
    assert flows(filled, CtFilter(src=parse_net("-s", A), dport=80, type="OUT", proto=6)) == {
        f"TCP OUT {A}:1000 -> {B}:80", f"TCP OUT {A}:1001 -> {B}:80"}
    assert flows(filled, CtFilter(proto=17, state="established")) == set()


def test_whole_tables_skipped_only_when_nothing_can_match() -> None:
    assert listing.skip_map(CT_MAP_TCP, CtFilter(proto=17))
    assert listing.skip_map(CT_MAP_ANY, CtFilter(state="syn"))
    assert listing.skip_map(CT_MAP_ANY, CtFilter(proto=6))
    assert not listing.skip_map(CT_MAP_SYN, CtFilter(src=parse_net("-s", A)))
    assert not listing.skip_map(CT_MAP_ANY, CtFilter(proto=1))


def test_extended_lines_read_like_proc_nf_conntrack(filled: LxcHarness) -> None:
    now = filled.now()
    recs = [r for c in listing.matching(filled.coll.maps[CT_MAP_TCP], CtFilter(sport=1000, type="OUT"))
            for r in c.records()]
    line = listing.extended_line(recs[0], now)
    assert line == (f"ipv4     2 tcp      6 100 ESTABLISHED src={A} dst={B} sport=1000 dport=80 packets=0 "
                    f"bytes=0 src={B} dst={A} sport=80 dport=1000 [ASSURED] mark=0 zone=0 use=1 dir=OUT")
    syn = [r for c in listing.matching(filled.coll.maps[CT_MAP_SYN], CtFilter()) for r in c.records()]
    assert " SYN_SENT " in listing.extended_line(syn[0], now) and "[UNREPLIED]" in listing.extended_line(syn[0], now)
    udp_ = [r for c in listing.matching(filled.coll.maps[CT_MAP_ANY], CtFilter(proto=17)) for r in c.records()]
    assert listing.extended_line(udp_[0], now).startswith(f"ipv4     2 udp      17 100 src={A} dst={C} sport=5353")


def ep(addr: str, port: int) -> str:
    """An address and port as `ct list` prints them (IPv6 in brackets)."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6])
def test_flush_matching_deletes_the_selection_and_its_nat(lxc: LxcHarness, family: Family) -> None:
    """Entries from real packets; a NodePort-owned entry takes its NAT entry along, from its
    family's NAT table; `ct flush` (every entry) empties both NAT tables."""
    a, b, c = (A, B, C) if family is Family.IPV4 else (A6, B6, C6)
    tables = cttables.names(family, (Proto.TCP, Proto.SYN, Proto.ANY))
    tcp_t = cttables.table(tables[0])
    for sport in (1000, 1001):
        lxc.egress(tcp(a, sport, b, 80, "S"))
        lxc.ingress(tcp(b, 80, a, sport, "SA"))
        lxc.egress(tcp(a, sport, b, 80, "A"))
    lxc.egress(udp(a, 4000, b, 53))
    put(lxc, tcp_t.name, c, 7000, b, 80, 6, TUPLE_F_OUT, seen_non_syn=1, node_port=1)
    nat_key = tcp_t.key.make(c, b, 7000, 80, 6, TUPLE_F_OUT)    # nat{4,6}_key_for_ct: reply b:80 -> c:7000
    nat_maps = [lxc.coll.maps[n] for n in cttables.NAT_NAMES]
    nat = lxc.coll.maps[tcp_t.nat]
    nat.update(nat_key, cttables.nat_table(tcp_t.nat).value())
    nat.update(tcp_t.key.make(b, c, 1, 2, 6, TUPLE_F_OUT), cttables.nat_table(tcp_t.nat).value())   # unowned
    maps = [lxc.coll.maps[n] for n in tables]
    layouts = {m.name: FilterLayout.of(m) for m in maps}
    before = flows(lxc, CtFilter(), tables)
    flt = CtFilter(sport=1001)

    res = Flusher(maps, nat=nat_maps, chunk=2).flush_matching(lambda name, k, v: flt.mask(layouts[name], k, v))
    after = flows(lxc, CtFilter(), tables)
    doomed = {f for f in before if ":1001 ->" in f}
    assert f"TCP OUT {ep(a, 1001)} -> {ep(b, 80)}" in doomed
    assert before - after == doomed
    assert res.ct_deleted == len(doomed) and res.nat_deleted == 0

    flt = CtFilter(src=parse_net("-s", c))
    res = Flusher(maps, nat=nat_maps).flush_matching(lambda name, k, v: flt.mask(layouts[name], k, v))
    assert res.ct_deleted == 1 and res.nat_deleted == 1
    assert nat.lookup(nat_key) is None and nat.count() == 1
    assert f"UDP OUT {ep(a, 4000)} -> {ep(b, 53)}" in flows(lxc, CtFilter(), tables)

    other = next(m for m in nat_maps if m is not nat)
    other.update(bytes(other.key_size), cttables.nat_table(other.name).value())
    res = Flusher(maps, nat=nat_maps).flush()
    assert res.nat_deleted == 2 and nat.count() == 0 and other.count() == 0


@pytest.mark.parametrize("fn,flag,text", [(parse_net, "--src", "10.0.0.300"), (parse_net, "--dst", "f00d::/129"),
                                          (parse_net, "--src", "f00d::1::2"),
                                          (parse_port, "--sport", "70000"), (parse_port, "--dport", "http"),
                                          (parse_proto, "--proto", "sctpx")])
def test_bad_values_name_their_flag(fn, flag: str, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        fn(flag, text)
    assert str(e.value).startswith(f"{flag}: must be") and repr(text) in str(e.value)


ALL6 = (CT_MAP_TCP, CT_MAP_SYN, CT_MAP_ANY, CT6_MAP_TCP, CT6_MAP_SYN, CT6_MAP_ANY)


@pytest.fixture
def dual(filled: LxcHarness) -> LxcHarness:
    put(filled, CT6_MAP_TCP, A6, 1000, B6, 80, 6, TUPLE_F_OUT, seen_non_syn=1)
    put(filled, CT6_MAP_TCP, A6, 1000, B6, 80, 6, TUPLE_F_IN, seen_non_syn=1)
    put(filled, CT6_MAP_SYN, C6, 2000, B6, 443, 6, TUPLE_F_OUT)
    put(filled, CT6_MAP_ANY, A6, 5353, C6, 53, 17, TUPLE_F_OUT)
    put(filled, CT6_MAP_ANY, A6, 7, B6, 0, 58, TUPLE_F_OUT)
    return filled


def test_ipv6_entries_print_as_the_reference_and_filter_by_family(dual: LxcHarness) -> None:
    """IPv6 addresses in brackets where a port follows; -s/-d take IPv6 prefixes and never
    select the other family; the other filters apply to both."""
    every = flows(dual, CtFilter(), ALL6)
    assert len(every) == 13
    assert {f for f in every if "[" in f} == {
        f"TCP OUT [{A6}]:1000 -> [{B6}]:80", f"TCP IN [{A6}]:1000 -> [{B6}]:80",
        f"TCP OUT [{C6}]:2000 -> [{B6}]:443", f"UDP OUT [{A6}]:5353 -> [{C6}]:53",
        f"ICMPv6 OUT [{A6}]:7 -> [{B6}]:0"}
    assert flows(dual, CtFilter(src=parse_net("-s", "f00d::/64")), ALL6) == {
        f"TCP OUT [{A6}]:1000 -> [{B6}]:80", f"TCP IN [{A6}]:1000 -> [{B6}]:80",
        f"UDP OUT [{A6}]:5353 -> [{C6}]:53", f"ICMPv6 OUT [{A6}]:7 -> [{B6}]:0"}
    assert flows(dual, CtFilter(dst=parse_net("-d", C6)), ALL6) == {f"UDP OUT [{A6}]:5353 -> [{C6}]:53"}
    assert all("[" not in f for f in flows(dual, CtFilter(src=parse_net("-s", "0.0.0.0/0")), ALL6))
    assert flows(dual, CtFilter(proto=parse_proto("-p", "icmpv6")), ALL6) == {f"ICMPv6 OUT [{A6}]:7 -> [{B6}]:0"}
    assert flows(dual, CtFilter(dport=443), ALL6) == {f"TCP OUT [{C6}]:2000 -> [{B6}]:443",
                                                      f"TCP OUT {C}:2000 -> {B}:443"}
    assert flows(dual, CtFilter(addrs=(C6,)), ALL6) == {f"TCP OUT [{C6}]:2000 -> [{B6}]:443",
                                                        f"UDP OUT [{A6}]:5353 -> [{C6}]:53"}
    assert flows(dual, CtFilter(state="syn"), ALL6) == {f"TCP OUT [{C6}]:2000 -> [{B6}]:443",
                                                        f"TCP OUT {C}:2000 -> {B}:443"}
    rec = next(r for c in listing.matching(dual.coll.maps[CT6_MAP_ANY], CtFilter(proto=17)) for r in c.records())
    assert {k: rec.to_json()[k] for k in ("family", "src", "sport", "dst", "dport", "proto")} == {
        "family": "ipv6", "src": A6, "sport": 5353, "dst": C6, "dport": 53, "proto": "UDP"}
    assert listing.extended_line(rec, dual.now()).startswith("ipv6     10 udp      17 ")


def test_flush_by_address_takes_the_ipv6_entries_of_an_ipv6_address(dual: LxcHarness) -> None:
    maps = [dual.coll.maps[t] for t in ALL6]
    nat = dual.coll.maps[NAT_MAP]
    nat.update(CtTuple4.make(B, C, 1, 2, 6, TUPLE_F_OUT), Nat4Entry())
    before = flows(dual, CtFilter(), ALL6)
    res = Flusher(maps, nat=nat).flush([A6, A])
    gone = before - flows(dual, CtFilter(), ALL6)
    assert {f for f in gone if "[" in f} == {f for f in before if f"[{A6}]" in f}
    assert {f for f in gone if "[" not in f} == {f for f in before if f"{A}:" in f}
    assert res.deleted[CT6_MAP_TCP] == 2 and res.deleted[CT6_MAP_ANY] == 2 and res.deleted[CT6_MAP_SYN] == 0
    assert nat.count() == 1
