"""Table pressure in the agent: fill after each GC pass, early GC under pressure, auto-grow.

The decision logic with explicit numbers (no BPF), then the agent as a subprocess with
small tables filled through the pinned map: grown with auto_grow on, untouched with it off."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from structlog.testing import capture_logs

from agent_harness import AgentProc
from tuplet.bpf.maps import Map
from tuplet.conntrack import pressure
from tuplet.conntrack.gc import GcResult, MapGcStats, NatCount
from tuplet.conntrack.runner import GcRunner
from tuplet.conntrack.schedule import FLOOR, GcSchedule
from tuplet.conntrack.sizing import LIMIT_MAX
from tuplet.datapath import abi, clock
from tuplet.datapath.abi import CT6_MAP_ANY, CT6_MAP_SYN, CT6_MAP_TCP, CT_MAP_ANY, CT_MAP_SYN, CT_MAP_TCP, NAT_MAP
from tuplet.datapath.layouts import CtEntry
from tuplet.node import apply as node_apply
from tuplet.node import config, sizes

CAPS = {CT_MAP_TCP: 4096, CT_MAP_ANY: 4096, CT_MAP_SYN: 1024, NAT_MAP: 4096,
        CT6_MAP_TCP: 4096, CT6_MAP_ANY: 4096, CT6_MAP_SYN: 1024, abi.NAT6_MAP: 4096}


def fills(**kw: float) -> dict[str, float]:
    names = {"tcp": CT_MAP_TCP, "any": CT_MAP_ANY, "syn": CT_MAP_SYN, "nat": NAT_MAP,
             "tcp6": CT6_MAP_TCP, "any6": CT6_MAP_ANY, "syn6": CT6_MAP_SYN, "nat6": abi.NAT6_MAP}
    return {names[k]: v for k, v in kw.items()}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- auto-grow decisions ----------------------------------------------------------------------

def test_off_by_default() -> None:
    assert config.Conntrack().auto_grow is False and config.Conntrack().auto_grow_max == 1 << 24
    g = pressure.AutoGrow()
    for _ in range(5):
        assert g.observe(fills(tcp=0.99, any=0.99, nat=0.99), CAPS) == []


def test_three_passes_at_90_percent() -> None:
    g = pressure.AutoGrow(enabled=True)
    assert g.observe(fills(tcp=0.91), CAPS) == []
    assert g.observe(fills(tcp=0.90), CAPS) == []
    [grow] = g.observe(fills(tcp=0.93), CAPS)
    assert (grow.map, grow.old_entries, grow.new_entries, grow.fill) == (CT_MAP_TCP, 4096, 8192, 0.93)
    assert "3 passes" in grow.trigger


def test_a_pass_below_90_percent_starts_the_count_again() -> None:
    g = pressure.AutoGrow(enabled=True)
    for f in (0.92, 0.92, 0.89, 0.92, 0.92):
        assert g.observe(fills(any=f), CAPS) == []
    assert [x.map for x in g.observe(fills(any=0.92), CAPS)] == [CT_MAP_ANY]


def test_one_pass_at_95_percent() -> None:
    g = pressure.AutoGrow(enabled=True)
    grows = g.observe(fills(tcp=0.5, nat=0.95), CAPS)
    assert [(x.map, x.new_entries) for x in grows] == [(NAT_MAP, 8192)] and "one pass" in grows[0].trigger
    # Decided once: not again while the main loop has not grown it yet.
    assert g.observe(fills(nat=0.97), CAPS) == []
    g.finished(NAT_MAP, ok=True)
    assert g.observe(fills(nat=0.5), {**CAPS, NAT_MAP: 8192}) == []   # the new size: fine now


def test_handshake_table_is_excluded() -> None:
    g = pressure.AutoGrow(enabled=True)
    for _ in range(4):
        assert g.observe(fills(syn=1.0, tcp=0.2), CAPS) == []
    assert pressure.under_pressure(fills(syn=1.0, tcp=0.2, any=0.89, nat=0.5)) == []
    assert pressure.under_pressure(fills(syn=1.0, tcp=0.9, nat=0.95)) == [CT_MAP_TCP, NAT_MAP]


def test_ipv6_tables_are_main_tables_and_grow_with_their_ipv4_twin() -> None:
    """A full IPv6 table brings GC forward and is grown as a main table; growing it sets
    the [conntrack] key that sizes it and its IPv4 twin. The IPv6 handshake table, as the
    IPv4 one, is only reported."""
    assert pressure.under_pressure(fills(syn6=1.0, tcp6=0.2, any6=0.89)) == []
    assert pressure.under_pressure(fills(tcp=0.5, tcp6=0.91, any6=0.95)) == [CT6_MAP_TCP, CT6_MAP_ANY]
    g = pressure.AutoGrow(enabled=True)
    assert g.observe(fills(syn6=1.0), CAPS) == []
    [grow] = g.observe(fills(any6=0.96, tcp=0.5), CAPS)
    assert (grow.map, grow.new_entries) == (CT6_MAP_ANY, 8192)
    cfg = config.parse('[node]\npin_root = "/sys/fs/bpf/tuplet/x"\n[conntrack]\ntcp_max = 4096\n'
                       'any_max = 4096\nmap_dynamic_size_ratio = 0.0\nauto_grow = true\n')
    grown = sizes.with_sizes(cfg, {grow.map: grow.new_entries, CT_MAP_ANY: 4096})
    assert grown.conntrack.any_max == 8192 and grown.conntrack.tcp_max == 4096
    eff, kept = sizes.keep_grown(cfg, {CT_MAP_TCP: 4096, CT6_MAP_TCP: 16384})
    assert kept == [(CT_MAP_TCP, 4096, 16384)] and eff.conntrack.sizing().tcp.entries == 16384
    assert pressure.TABLE_EVENTS[CT6_MAP_SYN] == ("insert_syn6", ("promoted6",))
    assert pressure.TABLE_EVENTS[CT6_MAP_TCP] == ("insert_tcp6", ())


def test_ceiling_caps_then_logs_once() -> None:
    g = pressure.AutoGrow(enabled=True, ceiling=6000)
    [grow] = g.observe(fills(tcp=0.96), CAPS)
    assert grow.new_entries == 6000                      # x2 would pass the ceiling
    g.finished(CT_MAP_TCP, ok=True)
    caps = {**CAPS, CT_MAP_TCP: 6000}
    with capture_logs() as logs:
        for _ in range(4):
            assert g.observe(fills(tcp=0.99), caps) == []
    at = [e for e in logs if e["event"] == "table cannot grow further"]
    assert len(at) == 1 and at[0]["map"] == CT_MAP_TCP and at[0]["ceiling"] == 6000
    # Raising the ceiling (a reload) lets it grow again.
    g.configure(True, 1 << 30)
    assert g.ceiling == LIMIT_MAX
    assert [x.new_entries for x in g.observe(fills(tcp=0.99), caps)] == [12000]


def test_sizing_maximum_is_a_ceiling_too() -> None:
    g = pressure.AutoGrow()
    g.configure(True, 1 << 30)
    assert g.ceiling == LIMIT_MAX
    [grow] = g.observe(fills(tcp=0.99), {CT_MAP_TCP: (1 << 24) - 1000})
    assert grow.new_entries == LIMIT_MAX


def test_failed_grow_is_retried_later() -> None:
    clock = Clock()
    g = pressure.AutoGrow(enabled=True, clock=clock)
    assert len(g.observe(fills(tcp=0.99), CAPS)) == 1
    g.finished(CT_MAP_TCP, ok=False)
    clock.t += pressure.RETRY_AFTER - 1
    assert g.observe(fills(tcp=0.99), CAPS) == []
    clock.t += 1
    assert len(g.observe(fills(tcp=0.99), CAPS)) == 1


def test_keep_grown_takes_the_larger_of_configured_and_pinned() -> None:
    cfg = config.parse('[node]\npin_root = "/sys/fs/bpf/tuplet/x"\n[conntrack]\ntcp_max = 4096\n'
                       'any_max = 4096\nmap_dynamic_size_ratio = 0.0\nauto_grow = true\n')
    same, kept = sizes.keep_grown(cfg, {CT_MAP_TCP: 4096, CT_MAP_ANY: 2048})
    assert kept == [] and same.conntrack.sizing().tcp.entries == 4096
    # NAT follows the CT sizes without dynamic sizing: (8192 + 4096) * 2 / 3.
    eff, kept = sizes.keep_grown(cfg, {CT_MAP_TCP: 8192, CT_MAP_ANY: 4096, NAT_MAP: 5461})
    assert kept == [(CT_MAP_TCP, 4096, 8192)]
    s = eff.conntrack.sizing()
    assert (s.tcp.entries, s.any.entries, s.nat.entries) == (8192, 4096, 8192)
    assert eff.conntrack.syn_entries(s) == 1024
    eff, kept = sizes.keep_grown(cfg, {NAT_MAP: 16384})
    assert kept == [(NAT_MAP, 5461, 16384)] and eff.conntrack.sizing().nat.entries == 16384
    grown = sizes.with_sizes(cfg, {CT_MAP_ANY: 8192})
    assert grown.conntrack.any_max == 8192 and grown.conntrack.tcp_max == 4096


# --- the schedule under pressure --------------------------------------------------------------

def test_pressure_brings_the_next_pass_forward_and_backs_off() -> None:
    s = GcSchedule()                                            # adaptive: 300 s
    assert s.after_pass(0.0, pressure_freed=0.0) == FLOOR == 10 and s.pressured
    assert [s.after_pass(0.0, 0.001) for _ in range(6)] == [20, 40, 80, 160, 300, 300]
    assert not s.pressured                                      # as late as without pressure
    assert s.after_pass(0.1, 0.02) == 10                        # freed 2%: back to 10 s
    assert s.after_pass(0.0, None) == 300 and not s.pressured   # no table under pressure


def test_pressure_never_lengthens_a_short_interval() -> None:
    s = GcSchedule(fixed=1)
    assert s.after_pass(0.0, 0.0) == 1 and not s.pressured
    capped = GcSchedule(fixed=3600, maximum=15)
    assert capped.after_pass(0.0, 0.0) == 10 and capped.after_pass(0.0, 0.0) == 15


class FakeGc:
    """Stands in for CtGc: hands out prepared results."""

    def __init__(self, results: list[GcResult]) -> None:
        self.results = results

    def run(self) -> GcResult:
        return self.results.pop(0)


def result(tcp_alive: int, syn_alive: int = 0, tcp_deleted: int = 0, syn_deleted: int = 0,
           nat: int | None = None, nat6: int | None = None, nat6_deleted: int = 0) -> GcResult:
    counted = [NatCount(name, n, 4096) for name, n in ((NAT_MAP, nat), (abi.NAT6_MAP, nat6)) if n is not None]
    return GcResult("kernel", [MapGcStats(CT_MAP_TCP, alive=tcp_alive, deleted=tcp_deleted, max_entries=4096),
                               MapGcStats(CT_MAP_ANY, alive=10, max_entries=4096),
                               MapGcStats(CT_MAP_SYN, alive=syn_alive, deleted=syn_deleted, max_entries=1024),
                               MapGcStats(CT6_MAP_TCP, alive=0, deleted=nat6_deleted, nat_deleted=nat6_deleted,
                                          max_entries=4096)],
                    nat_counts=counted)


def test_runner_runs_pressure_passes_for_main_tables_only() -> None:
    clock = Clock()
    runs = [result(4000), result(4000), result(100), result(100, syn_alive=1024, syn_deleted=1024)]
    r = GcRunner(FakeGc(runs), GcSchedule(fixed=3600), clock=clock, max_wait=0)
    rep = r.run_pass("start")
    assert rep.pressure == (CT_MAP_TCP,) and rep.interval == 10
    assert rep.fill[CT_MAP_TCP] == pytest.approx(4000 / 4096) and NAT_MAP not in rep.fill
    clock.t += 10
    rep = r.step()
    assert rep is not None and rep.reason == "pressure" and rep.interval == 20   # freed nothing: back off
    clock.t += 20
    rep = r.step()
    assert rep.reason == "pressure" and rep.pressure == () and rep.interval == 3600
    clock.t += 3600
    rep = r.step()   # the handshake table full (a SYN flood): reported, no pressure
    assert rep.reason == "interval" and rep.fill[CT_MAP_SYN] == 1.0 and rep.pressure == ()
    assert rep.interval == 3600


@pytest.mark.parametrize("nat", [NAT_MAP, abi.NAT6_MAP])
def test_nat_fill_counts_when_counted(nat: str) -> None:
    """Either NAT table's fill is a main table's: pressure and capacity, each on its own."""
    res = result(10, **{"nat" if nat == NAT_MAP else "nat6": 3900})
    assert res.fill()[nat] == pytest.approx(3900 / 4096) and len(res.fill()) == 5
    assert pressure.under_pressure(res.fill()) == [nat]
    assert pressure.capacities(res)[nat] == 4096


def test_nat_freed_is_its_own_ct_tables_nat_deletions() -> None:
    """What a pass freed in a NAT table: the NAT entries its family's CT entries took along."""
    res = result(10, nat=3900, nat6=3900, nat6_deleted=409)
    assert res.nat_deleted_in(abi.NAT6_MAP) == 409 and res.nat_deleted_in(NAT_MAP) == 0
    assert pressure.freed(res, [abi.NAT6_MAP]) == pytest.approx(409 / 4096)
    assert pressure.freed(res, [NAT_MAP]) == 0


# --- evictions --------------------------------------------------------------------------------

def ev(tcp: int, syn: int, promoted: int, any_: int = 0) -> dict[str, int]:
    return {"insert_tcp": tcp, "insert_syn": syn, "insert_any": any_, "promoted": promoted,
            "promote_failed": 0, "insert_failed": 0}


def test_eviction_estimate() -> None:
    e = pressure.EvictionEstimate()
    # First pass: the baseline (counters after it).
    assert e.observe(result(100, syn_alive=50), ev(0, 0, 0), ev(100, 150, 100)) == {}
    assert e.observe(result(100), ev(0, 0, 0), None) == {}          # no counters: nothing
    # 1000 SYNs more, 20 promoted (20 TCP inserts), GC deleted 30 expired SYN entries:
    # 50 + 1000 - 20 - (1000 alive + 30 deleted) = 0 evicted.
    assert e.observe(result(120, syn_alive=1000, syn_deleted=30), ev(120, 1150, 120), ev(120, 1150, 120)) == {}
    # 5000 SYNs more, the table full: 1000 + 5000 - 1024 = 4976 evicted.
    got = e.observe(result(120, syn_alive=1024), ev(120, 6150, 120), ev(120, 6150, 120))
    assert got == {CT_MAP_SYN: 4976}
    # TCP: 50 more inserted, 10 alive fewer, nothing deleted: 60 evicted.
    got = e.observe(result(110, syn_alive=1024), ev(170, 6150, 120), ev(170, 6150, 120))
    assert got == {CT_MAP_TCP: 60}
    e.restart()
    assert e.observe(result(5), ev(0, 0, 0), ev(0, 0, 0)) == {}     # new baseline after an apply


def test_eviction_counter_never_goes_back() -> None:
    e = pressure.EvictionEstimate()
    e.observe(result(100), ev(100, 0, 0), ev(100, 0, 0))
    assert e.observe(result(50), ev(200, 0, 0), ev(200, 0, 0)) == {CT_MAP_TCP: 150}
    assert e.observe(result(300), ev(210, 0, 0), ev(210, 0, 0)) == {}            # looks negative: nothing
    # From the start: 100 + 160 inserted - 50 alive = 210 evicted, 150 reported already.
    assert e.observe(result(50), ev(260, 0, 0), ev(260, 0, 0)) == {CT_MAP_TCP: 60}


def test_eviction_estimate_on_the_real_tables() -> None:
    """A SYN flood overflows the handshake table (1024) of the real programs: the estimate
    from GC passes and the datapath's counters is what the LRU evicted, exactly (nothing
    runs concurrently here); established entries were evicted from nowhere."""
    import random
    import struct

    from lxc_harness import LxcHarness, tcp
    from tuplet.conntrack.gc import CtGc
    from tuplet.datapath import events as ct_events
    from tuplet.datapath.abi import OBJ_LXC
    from tuplet.datapath.paths import object_dir

    a, b = "10.64.0.36", "10.64.0.64"
    h = LxcHarness.load(consts={"ct_syn_table": 1})
    try:
        h.add_endpoint(a, 3096)
        h.add_endpoint(b, 4000)
        for i in range(50):   # established: promoted into tpl_ct4_v1
            h.egress(tcp(a, 20000 + i, b, 80, "S"))
            h.ingress(tcp(b, 80, a, 20000 + i, "SA"))
            h.egress(tcp(a, 20000 + i, b, 80, "A"))
        names = ct_events.event_names(str(object_dir() / OBJ_LXC))
        events = h.coll.maps[abi.EVENTS_MAP]
        est = pressure.EvictionEstimate()
        maps = [h.coll.maps[n] for n in (CT_MAP_TCP, CT_MAP_ANY, CT_MAP_SYN)]
        with CtGc(maps, nat=[h.coll.maps[NAT_MAP], h.coll.maps[abi.NAT6_MAP]], count_nat=True) as gc:
            runner = GcRunner(gc, GcSchedule(), probe=lambda: ct_events.read(events, names))
            rep = runner.run_pass("start")
            assert est.observe(rep.result, rep.events_before, rep.events_after) == {}
            syn_before = h.coll.maps[CT_MAP_SYN].count()

            rnd = random.Random(5)
            prog = h.coll.programs["cil_from_container"]
            pkt = bytearray(tcp("172.16.0.1", 1, b, 80, "S"))
            for _ in range(3000):
                struct.pack_into("!I", pkt, 26, 0xAC100000 | rnd.getrandbits(20))
                struct.pack_into("!H", pkt, 34, 1024 + rnd.getrandbits(15))
                prog.test_run(bytes(pkt))
            inserted = ct_events.read(events, names)["insert_syn"] - rep.events_after["insert_syn"]

            rep = runner.run_pass("interval")
            got = est.observe(rep.result, rep.events_before, rep.events_after)
        syn_after = h.coll.maps[CT_MAP_SYN].count()
        assert inserted > 2900 and syn_after >= 700   # an LRU evicts before it is strictly full
        assert got == {CT_MAP_SYN: inserted - (syn_after - syn_before)}
        assert rep.fill[CT_MAP_SYN] == pytest.approx(syn_after / 1024) and rep.pressure == ()
        assert rep.fill[CT_MAP_TCP] == pytest.approx(50 / 4096) and {NAT_MAP, abi.NAT6_MAP} <= set(rep.fill)
    finally:
        h.close()


# --- the agent --------------------------------------------------------------------------------

def agent_config(pin_root: str, auto_grow: bool) -> str:
    return textwrap.dedent(f"""
        [node]
        name = "autogrow-test"
        pin_root = "{pin_root}"

        [lb]
        socket_lb = false

        [conntrack]
        tcp_max = 4096
        any_max = 4096
        nat_max = 4096
        gc_interval = "1s"
        auto_grow = {str(auto_grow).lower()}
    """)


def fill_tcp(pin_root: str, n: int) -> None:
    """n live TCP entries (lifetime far ahead) in the pinned TCP table, by batch updates."""
    with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as m:
        idx = np.arange(1, n + 1, dtype=np.uint32)
        keys = np.zeros((n, m.key_size), np.uint8)
        keys[:, 0:4] = idx.view(np.uint8).reshape(n, 4)          # daddr = i
        keys[:, 4:8] = 0x0A                                       # saddr 10.0.0.0-ish
        keys[:, 12] = 6                                           # TCP
        vals = np.zeros((n, m.value_size), np.uint8)
        off = CtEntry.lifetime.offset
        life = np.full(n, clock.monotonic_now() + 100_000, np.uint32)
        vals[:, off:off + 4] = life.view(np.uint8).reshape(n, 4)
        m.update_batch(keys.tobytes(), vals.tobytes(), n)
        assert m.count() == n


def pinned(pin_root: str, name: str = CT_MAP_TCP) -> tuple[int, int]:
    with Map.from_pin(f"{pin_root}/{name}") as m:
        return m.max_entries, m.count()


def metric(a: AgentProc, name: str, **labels: str) -> float | None:
    return a.scrape().get((name, tuple(sorted(labels.items()))))


def eventually(a: AgentProc, fn, timeout: float = 10):
    deadline = time.time() + timeout
    while True:
        a.drain()
        try:
            return fn()
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def passes_under_pressure(a: AgentProc) -> int:
    return sum(1 for e in a.events() if e.get("event") == "gc scheduled pass" and e["pressure"] == [CT_MAP_TCP])


@pytest.fixture
def agent(tmp_path, pin_root):
    made: list[AgentProc] = []

    def start(auto_grow: bool) -> AgentProc:
        cfg = tmp_path / "tuplet.toml"
        cfg.write_text(agent_config(pin_root, auto_grow))
        a = AgentProc(cfg, tmp_path, watchdog_usec=4_000_000)
        made.append(a)
        a.wait_for("READY=1", timeout=30)
        return a

    yield start
    for a in made:
        a.close()
    node_apply.teardown(pin_root)


N = 3930   # 96% of 4096: above 95% after one pass


def test_agent_grows_a_full_table_and_keeps_it_grown(agent, pin_root) -> None:
    a = agent(auto_grow=True)
    assert pinned(pin_root) == (4096, 0)
    fill_tcp(pin_root, N)
    grown = a.wait_event("table grown", timeout=15, map=CT_MAP_TCP)
    assert (grown["old_entries"], grown["new_entries"]) == (4096, 8192)
    assert grown["fill"] >= 0.95 and "one pass" in grown["trigger"] and grown["copied"] == N
    assert pinned(pin_root) == (8192, N)                      # grown live, every entry kept
    assert metric(a, "tuplet_conntrack_auto_grow_total", map_name=CT_MAP_TCP) == 1
    assert metric(a, "tuplet_bpf_map_capacity", map_name=CT_MAP_TCP) == 8192
    st = subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "status"],
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "auto-grow:  on" in st.stdout, st.stdout + st.stderr
    assert f"grown:      {CT_MAP_TCP} 4096 -> 8192" in st.stdout, st.stdout

    def fill_after_the_grow() -> None:   # the first pass on the new table
        assert metric(a, "tuplet_datapath_conntrack_gc_table_fill_ratio", map_name=CT_MAP_TCP) == \
            pytest.approx(N / 8192)
    eventually(a, fill_after_the_grow)
    assert metric(a, "tuplet_datapath_conntrack_gc_table_fill_ratio", map_name=NAT_MAP) == 0
    assert metric(a, "tuplet_datapath_conntrack_gc_table_fill_ratio", map_name=abi.NAT6_MAP) == 0
    pressured = [e for e in a.events() if e.get("event") == "table pressure"]
    assert pressured and pressured[0]["under_pressure"] == [CT_MAP_TCP]
    gc_pass = [e for e in a.events() if e.get("event") == "gc pass"]
    assert set(gc_pass[-1]["fill"]) >= {CT_MAP_TCP, CT_MAP_ANY, NAT_MAP, abi.NAT6_MAP}

    # A reload with the file's 4096 does not shrink it back.
    mark = len(a.events())
    a.proc.send_signal(signal.SIGHUP)
    a.wait_event("reloaded", since=mark)
    kept = a.wait_event("table kept at its pinned size", since=mark)
    assert (kept["map"], kept["configured"], kept["pinned"]) == (CT_MAP_TCP, 4096, 8192)
    assert pinned(pin_root) == (8192, N)
    # Nor does a restart.
    a.proc.send_signal(signal.SIGTERM)
    a.wait_for("STOPPING=1")
    assert a.proc.wait(timeout=20) == 0
    b = agent(auto_grow=True)
    b.wait_event("table kept at its pinned size", map=CT_MAP_TCP)
    assert pinned(pin_root) == (8192, N)
    assert not any(e.get("event") == "table grown" for e in b.events())


def test_agent_without_auto_grow_grows_nothing(agent, pin_root) -> None:
    a = agent(auto_grow=False)
    fill_tcp(pin_root, N)

    def three_passes_at_96_percent() -> None:
        assert passes_under_pressure(a) >= 3
    eventually(a, three_passes_at_96_percent, timeout=15)
    assert pinned(pin_root) == (4096, N)
    assert not any(e.get("event") in ("table grown", "table kept at its pinned size") for e in a.events())
    m = a.scrape()
    assert {k[1]: v for k, v in m.items() if k[0] == "tuplet_conntrack_auto_grow_total"} == \
        {(("map_name", t),): 0 for t in pressure.MAIN_TABLES}      # exported at 0 from the start
    assert m[("tuplet_datapath_conntrack_gc_table_fill_ratio", (("map_name", CT_MAP_TCP),))] == \
        pytest.approx(N / 4096)
    assert a.proc.poll() is None


def test_a_failed_grow_is_logged_and_the_datapath_runs_on(pin_root, tmp_path, monkeypatch) -> None:
    """The agent in this process: the GC thread asks for a grow, the apply fails."""
    from tuplet.agent import service as agentmod
    from tuplet.core.errors import TupletError

    cfg = tmp_path / "tuplet.toml"
    cfg.write_text(agent_config(pin_root, auto_grow=True))
    ag = agentmod.Agent(str(cfg), lambda c: c, "", notify=lambda *a: None)
    try:
        ag.start()
        fill_tcp(pin_root, N)
        deadline = time.time() + 10   # the next pass (1 s) sees 96%
        while not ag._grow_requests and time.time() < deadline:
            time.sleep(0.05)
        assert [(g.map, g.new_entries) for g in ag._grow_requests] == [(CT_MAP_TCP, 8192)]

        def boom(_cfg):
            raise TupletError(f"map {CT_MAP_TCP}", "create", 12)
        monkeypatch.setattr(node_apply, "apply", boom)
        with capture_logs() as logs:
            assert ag.grow() is False
            seen = set()      # passes after the failure (GC restarted: tell them by their time)
            end = time.time() + 2.5
            while time.time() < end:   # more passes at 96%: no new request before RETRY_AFTER
                seen.add((ag.gc_last or {}).get("at"))
                time.sleep(0.05)
        failed = [e for e in logs if e["event"] == "table grow failed"]
        assert len(failed) == 1 and failed[0]["maps"] == {CT_MAP_TCP: 8192} and "ENOMEM" in failed[0]["error"]
        assert not any(e["event"] == "table grown" for e in logs)
        assert ag.gc is not None and ag.gc.alive() and ag._grow_requests == []
        # GC went on (seen in the agent's record: the GC thread's logger may be bound before
        # capture_logs when other tests ran first in this process).
        assert len(seen - {None}) >= 2, seen
        assert pinned(pin_root) == (4096, N)
    finally:
        ag.shutdown()
        node_apply.teardown(pin_root)


def test_a_reload_failing_with_any_error_keeps_the_agent_and_datapath(pin_root, tmp_path, monkeypatch) -> None:
    """SIGHUP's apply raising something other than TupletError (an OSError, a netlink error)
    is a failed reload like any other: logged, recorded, GC running again on the old datapath."""
    from tuplet.agent import service as agentmod

    cfg = tmp_path / "tuplet.toml"
    cfg.write_text(agent_config(pin_root, auto_grow=False))
    ag = agentmod.Agent(str(cfg), lambda c: c, "", notify=lambda *a: None)
    try:
        ag.start()
        before = pinned(pin_root)

        def boom(_cfg):
            raise OSError(16, "Device or resource busy")
        monkeypatch.setattr(node_apply, "apply", boom)
        with capture_logs() as logs:
            assert ag.reload() is False
        failed = [e for e in logs if e["event"] == "reload failed"]
        assert len(failed) == 1 and "busy" in failed[0]["error"] and failed[0]["error_type"] == "OSError"
        assert ag.last_reload is not None and ag.last_reload["ok"] is False
        assert ag.gc is not None and ag.gc.alive()
        assert pinned(pin_root) == before
    finally:
        ag.shutdown()
        node_apply.teardown(pin_root)


def test_gc_loop_keeps_the_fds_of_a_thread_that_does_not_stop() -> None:
    """Closing a map fd under a GC pass still running would let the next open reuse the
    number: stop() gives up after its timeout and leaves the fds open."""
    from tuplet.agent.gcloop import GcLoop

    closed: list[str] = []

    class Held:
        def close(self) -> None:
            closed.append("map")

    release = threading.Event()
    loop = GcLoop("/nonexistent", config.Conntrack(), on_pass=lambda rep: None)
    loop.thread = threading.Thread(target=release.wait, daemon=True)
    loop.thread.start()
    loop._keep(Held())
    try:
        assert loop.stop(timeout=0.2) is False
        assert closed == []
    finally:
        release.set()
        loop.thread.join()
    done = GcLoop("/nonexistent", config.Conntrack(), on_pass=lambda rep: None)
    done._keep(Held())
    assert done.stop() is True and closed == ["map"]
