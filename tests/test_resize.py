"""Live resize of the conntrack and NAT tables by `apply`, with real connections running."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from traffic import LiveConnection, start_server
from tuplet.bpf.links import attached_prog_id
from tuplet.bpf.maps import Map
from tuplet.conntrack import records as ct
from tuplet.conntrack import resize
from tuplet.conntrack.sizing import Sizing
from tuplet.datapath import clock, cttables
from tuplet.datapath.abi import CT6_MAP_SYN, CT_MAP_ANY, CT_MAP_SYN, CT_MAP_TCP
from tuplet.datapath.cttables import Family, Proto
from tuplet.datapath.layouts import CtEntry, CtTuple4
from tuplet.lb import writer as lb
from tuplet.node import apply as node_apply
from tuplet.node import config, netns, state
from two_pods import POD2, node_config_text, two_pods

pytestmark = [pytest.mark.netns, pytest.mark.clock]

MODES = ["tcx", "tc"]


@pytest.fixture
def topo():
    yield from two_pods()


def node_config(topo, pin_root: str, mode: str, tcp_max: int) -> config.NodeConfig:
    return config.parse(node_config_text(topo, pin_root, name="resize", mode=mode,
                                         conntrack=f"tcp_max = {tcp_max}\nany_max = 1024\nnat_max = 2048\n"
                                                   "accounting = true"))   # Packets show traffic


@pytest.fixture
def applied(topo, pin_root):
    done = []

    def apply(mode: str, tcp_max: int) -> node_apply.ApplyResult:
        res = node_apply.apply(node_config(topo, pin_root, mode, tcp_max))
        done.append(res)
        return res

    yield apply
    if done:
        node_apply.teardown(pin_root)


@pytest.fixture
def live(topo):
    """Call after the first apply: an echo server in pod2 and three open connections to it."""
    procs = []

    def start() -> list[LiveConnection]:
        procs.append(start_server(topo, topo.p2, 8000))
        conns = [LiveConnection(topo, topo.p1, POD2, 8000) for _ in range(3)]
        for i, c in enumerate(conns):
            assert c.roundtrip(f"hello{i}") == f"hello{i}"
        procs.extend(c.proc for c in conns)
        return conns

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=5)


def tcp_entries(pin_root: str) -> dict[tuple[str, int], CtEntry]:
    """(direction, client port) -> entry, read from the pinned TCP table."""
    with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as m:
        return {(r.direction, r.src[1]): r.entry for r in ct.records(m)}


def pinned(pin_root: str, name: str = CT_MAP_TCP):
    with Map.from_pin(f"{pin_root}/{name}") as m:
        return m.info


def prog_ids(topo, pin_root: str) -> dict[tuple[str, str], int]:
    st = state.load(pin_root)
    with netns.enter(topo.node.netns):
        return {(a.ifname, a.hook.value): attached_prog_id(a) for a in st.attachments}


def one(res: node_apply.ApplyResult, name: str = CT_MAP_TCP) -> resize.Resized:
    hits = [r for r in res.resized if r.map == name]
    # The handshake table's default size follows the TCP table's (an eighth); each IPv6
    # table is sized as its IPv4 twin, both NAT tables by nat_max (cttables.sized_as).
    key = cttables.sized_as(name)
    expected = {CT_MAP_SYN, CT6_MAP_SYN} if key == CT_MAP_TCP else set()
    expected |= {n for n in (*cttables.NAMES, *cttables.NAT_NAMES) if cttables.sized_as(n) == key}
    others = {r.map for r in res.resized if r.map != name}
    assert len(hits) == 1 and others <= expected, res.resized
    return hits[0]


def check_live(pin_root: str, conns: list[LiveConnection], tag: str) -> None:
    """Every connection has its OUT and IN entries in the pinned table, still works, and the
    packets it sends are counted in the pinned table (the programs use the pinned map)."""
    before = tcp_entries(pin_root)
    for c in conns:
        assert ("OUT", c.sport) in before and ("IN", c.sport) in before, sorted(before)
    for c in conns:
        assert c.roundtrip(tag) == tag
    after = tcp_entries(pin_root)
    for c in conns:
        assert after[("OUT", c.sport)].packets > before[("OUT", c.sport)].packets
        assert after[("IN", c.sport)].packets > before[("IN", c.sport)].packets


def no_stray_pins(pin_root: str) -> None:
    assert not [p for p in os.listdir(pin_root) if p.startswith(resize.TMP_PREFIX)]


@pytest.mark.parametrize("mode", MODES)
def test_grow_and_shrink_with_live_connections(topo, pin_root, applied, live, mode) -> None:
    applied(mode, 4096)
    conns = live()
    progs = prog_ids(topo, pin_root)
    live_count = len(tcp_entries(pin_root))
    assert live_count == 6   # OUT and IN per connection

    for old, new in ((4096, 16384), (16384, 2048)):   # grow; shrink above the live count
        info = pinned(pin_root)
        r = one(applied(mode, new))
        assert (r.old_entries, r.new_entries, r.copied, r.dropped) == (old, new, live_count, 0)
        now = pinned(pin_root)
        assert now.max_entries == new and now.id != info.id
        assert now.btf_id != 0 and now.btf_value_type_id == info.btf_value_type_id
        assert pinned(pin_root, CT_MAP_ANY).max_entries == 1024
        ids = prog_ids(topo, pin_root)
        assert ids.keys() == progs.keys() and all(ids[k] != progs[k] for k in ids)   # swapped
        progs = ids
        check_live(pin_root, conns, f"after-{new}")
        no_stray_pins(pin_root)
        st = state.load(pin_root)
        assert Sizing.from_json(st.sizing).tcp.entries == new

    # bpftool still prints the entries as structs (the new map carries the BTF).
    dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{pin_root}/{CT_MAP_TCP}"],
                          capture_output=True, text=True, check=True)
    first = json.loads(dump.stdout)[0]["formatted"]
    assert {"lifetime", "src_sec_id"} <= set(first["value"]) and "sport" in first["key"]

    # Shrink below the live count: 1500 stale synthetic entries beside the real ones.
    # Older than every live entry at any uptime (the clock may be only seconds old: never below 0, a u32).
    stale = max(clock.monotonic_now() - 1000, 0)
    with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as m:
        for i in range(1500):
            key = CtTuple4.make(f"10.99.{i // 250}.{i % 250 + 1}", "10.98.0.1", 80, 20000 + i, 6, 0)
            m.update(key, CtEntry(lifetime=stale + i % 100, packets=1))
        total = m.count()
    assert total == 1506
    r = one(applied(mode, 1024))
    assert (r.old_entries, r.new_entries) == (2048, 1024)
    assert r.dropped >= total - 1024 and r.copied + r.dropped == total
    with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as m:
        assert m.max_entries == 1024 and m.count() == r.copied <= 1024
    check_live(pin_root, conns, "after-shrink")   # the real connections were the most recent
    no_stray_pins(pin_root)


@pytest.mark.parametrize("mode", MODES)
def test_failure_before_the_swap_changes_nothing(topo, pin_root, applied, live, mode,
                                                 monkeypatch) -> None:
    applied(mode, 4096)
    conns = live()
    info, progs, pins = pinned(pin_root), prog_ids(topo, pin_root), sorted(os.listdir(pin_root))

    def boom(self, t):
        raise RuntimeError("injected copy failure")

    monkeypatch.setattr(resize.Resizer, "_first_copy", boom)
    with pytest.raises(RuntimeError, match="injected"):
        node_apply.apply(node_config(topo, pin_root, mode, 16384))
    assert pinned(pin_root) == info                    # same map (id), same size
    assert prog_ids(topo, pin_root) == progs           # programs not swapped
    assert sorted(os.listdir(pin_root)) == pins
    assert Sizing.from_json(state.load(pin_root).sizing).tcp.entries == 4096
    check_live(pin_root, conns, "still")


@pytest.mark.parametrize("mode", MODES)
def test_failure_after_the_swap_puts_the_old_programs_back(topo, pin_root, applied, live, mode,
                                                           monkeypatch) -> None:
    applied(mode, 4096)
    conns = live()
    info, progs, pins = pinned(pin_root), prog_ids(topo, pin_root), sorted(os.listdir(pin_root))
    swapped = {}

    def boom(*a, **kw):   # runs after every hook got the new programs
        swapped.update(prog_ids(topo, pin_root))
        raise RuntimeError("injected failure after the swap")

    monkeypatch.setattr(lb, "sync_config", boom)
    with pytest.raises(RuntimeError, match="injected"):
        node_apply.apply(node_config(topo, pin_root, mode, 16384))
    assert all(swapped[k] != progs[k] for k in progs)  # the new programs had been attached
    assert prog_ids(topo, pin_root) == progs           # and the old ones are back
    assert pinned(pin_root) == info
    assert sorted(os.listdir(pin_root)) == pins
    check_live(pin_root, conns, "still")


def pin_only(pin_root: str, nat_max: int, tcp_max: int = 2048) -> config.NodeConfig:
    return config.parse(f'[node]\nname = "pins"\npin_root = "{pin_root}"\n\n'
                        '[lb]\nsocket_lb = false\n'
                        f'[conntrack]\ntcp_max = {tcp_max}\nany_max = 1024\nnat_max = {nat_max}\n')


#: Per family: the client, the backend, and the i-th address of a block of others.
ADDRS = {Family.IPV4: ("10.0.0.9", "10.1.0.1", lambda i: f"10.2.{i // 250}.{i % 250 + 1}"),
         Family.IPV6: ("fd00::9", "fd01::1", lambda i: f"fd02::{i + 1:x}")}


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6])
def test_nat_resize_keeps_owned_then_newest_entries(pin_root, family: Family) -> None:
    """No namespaces: a NAT table with synthetic entries, some owned by a CT entry of its
    family (both NAT tables are sized by nat_max and resized together)."""
    t = cttables.table(cttables.names(family, (Proto.TCP,))[0])
    value = cttables.nat_table(t.nat).value
    client, backend, other = ADDRS[family]
    node_apply.apply(pin_only(pin_root, 2048))
    try:
        now = clock.monotonic_now()
        owned = []
        with Map.from_pin(f"{pin_root}/{t.name}") as tcp, Map.from_pin(f"{pin_root}/{t.nat}") as nat:
            for i in range(10):   # NodePort flows: the CT entry owns a NAT entry, created long ago
                key = t.key.make(client, backend, 30080, 40000 + i, 6, 0)
                tcp.update(key, CtEntry(lifetime=now + 1000, node_port=1))
                nkey = t.key(saddr=key.saddr, sport=key.dport, daddr=key.daddr, dport=key.sport,
                             nexthdr=6, flags=0)   # nat{4,6}_key_for_ct: the backend's reply
                nat.update(nkey, value(created=1))
                owned.append(bytes(nkey))
            for i in range(1500):
                nat.update(t.key.make(other(i), backend, 80, 1000 + i, 17, 0), value(created=100 + i))

        res = node_apply.apply(pin_only(pin_root, 4096))   # grow: everything
        r = one(res, t.nat)
        assert (r.old_entries, r.new_entries, r.copied, r.dropped) == (2048, 4096, 1510, 0)
        assert {x.map for x in res.resized} >= set(cttables.NAT_NAMES)   # nat_max sizes both

        res = node_apply.apply(pin_only(pin_root, 1024))   # shrink below the live count
        r = one(res, t.nat)
        assert r.copied + r.dropped == 1510 and r.dropped >= 486
        with Map.from_pin(f"{pin_root}/{t.nat}") as nat:
            assert nat.max_entries == 1024 and nat.info.btf_id != 0
            kept = dict(nat.items())
        assert all(k in kept for k in owned)           # owned by a live CT entry: kept though oldest
        created = sorted(value.from_buffer_copy(v).created for k, v in kept.items() if k not in owned)
        assert len(created) == r.copied - 10
        assert created[0] >= 100 + 1500 - len(created)   # the newest of the rest
        for n in cttables.NAT_NAMES:
            with Map.from_pin(f"{pin_root}/{n}") as nat:
                assert nat.max_entries == 1024, n
        with Map.from_pin(f"{pin_root}/{t.name}") as tcp:
            assert tcp.count() == 10 and tcp.max_entries == 2048   # CT untouched
        no_stray_pins(pin_root)
    finally:
        node_apply.teardown(pin_root)


def test_late_entries_are_copied_without_overwriting(pin_root, monkeypatch) -> None:
    """What the old programs do between the first copy and the swap, simulated on the maps."""
    node_apply.apply(pin_only(pin_root, 2048))
    try:
        def key(i: int) -> CtTuple4:
            return CtTuple4.make("10.0.0.9", "10.1.0.1", 80, 1000 + i, 6, 0)

        with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as tcp:
            for i in range(1100):
                tcp.update(key(i), CtEntry(lifetime=i))
        first_copy = resize.Resizer.copy

        def copy_then_race(self) -> None:
            first_copy(self)
            t = self.tables[CT_MAP_TCP]
            t.old.update(key(5000), CtEntry(lifetime=5000))      # created by an old program
            t.old.update(key(0), CtEntry(lifetime=7000))         # dropped by the shrink: stays dropped
            t.old.update(key(1099), CtEntry(lifetime=6000))      # updated by an old program
            t.new.update(key(1098), CtEntry(lifetime=9000))      # written by a new program since
            t.old.update(key(1098), CtEntry(lifetime=8000))

        monkeypatch.setattr(resize.Resizer, "copy", copy_then_race)
        r = one(node_apply.apply(pin_only(pin_root, 2048, tcp_max=1024)))
        assert (r.old_entries, r.new_entries) == (2048, 1024)
        with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as tcp:
            got = {k: CtEntry.from_buffer_copy(v).lifetime for k, v in tcp.items()}
        assert got[bytes(key(5000))] == 5000           # copied after the swap
        assert bytes(key(0)) not in got                # the shrink's choice holds
        assert got[bytes(key(1099))] == 1099           # first-copy value (the known window)
        assert got[bytes(key(1098))] == 9000           # never overwritten
        assert len(got) <= 1024 and r.dropped == 1100 - (r.copied - 1)
    finally:
        node_apply.teardown(pin_root)
