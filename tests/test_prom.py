"""Prometheus metrics (tuplet.prom) against a real datapath pinned under a test pin root:
packets run through the programs, a real GC pass, scrapes over HTTP."""
from __future__ import annotations

import itertools
import json
import os
import re
import socket
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from lxc_harness import LxcHarness, tcp, udp
from tuplet.agent import collector, gc_metrics, http
from tuplet.bpf import _libbpf as C
from tuplet.bpf.libbpf import check, cstr
from tuplet.bpf.maps import Map
from tuplet.conntrack.gc import CtGc
from tuplet.conntrack.runner import GcRunner
from tuplet.conntrack.schedule import GcSchedule
from tuplet.core.errors import ConfigError, TupletError
from tuplet.datapath import abi, clock, cttables, metrics
from tuplet.datapath.abi import (
    CT6_MAP_ANY,
    CT6_MAP_TCP,
    CT_MAP_ANY,
    CT_MAP_SYN,
    CT_MAP_TCP,
    METRICS_MAP,
    NAT_MAP,
    OBJ_LXC,
)
from tuplet.datapath.layouts import CtEntry, CtTuple6, Nat6Entry
from tuplet.datapath.paths import object_dir, open_pinned
from tuplet.lb import writer as lb
from tuplet.lb.model import Backend, Service, ServiceType
from tuplet.node import state
from tuplet.node.apply import open_object
from tuplet.node.config import NodeConfig

A, B, VIP = "10.64.0.36", "10.64.0.64", "10.68.0.10"
DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "tuplet-conntrack.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def dp(pin_root: str) -> Iterator[LxcHarness]:
    """bpf_lxc.o loaded with its maps pinned under pin_root."""
    spec = open_object(OBJ_LXC, NodeConfig(), pin_root=pin_root)
    spec.set_max_entries(CT_MAP_TCP, 4096)
    spec.set_max_entries(CT_MAP_ANY, 2048)
    spec.set_max_entries(NAT_MAP, 4096)
    h = LxcHarness(spec.load())
    yield h
    h.close()
    state.remove(pin_root)


def established(h: LxcHarness, sport: int) -> None:
    h.egress(tcp(A, sport, B, 80, "S"))
    h.ingress(tcp(B, 80, A, sport, "SA"))
    h.egress(tcp(A, sport, B, 80, "A"))


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape_http(server: http.MetricsServer, host: str = "127.0.0.1") -> tuple[str, Samples]:
    h = f"[{host}]" if ":" in host else host
    body = urllib.request.urlopen(f"http://{h}:{server.port}/metrics", timeout=10).read().decode()
    return body, samples(body)


def scrape(reg: CollectorRegistry) -> Samples:
    return samples(generate_latest(reg).decode())


def m(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def pinned_count(pin_root: str, name: str) -> tuple[int, int]:
    with Map.from_pin(os.path.join(pin_root, name)) as mp:
        return mp.count(), mp.max_entries


# --- the datapath collector ---------------------------------------------------------------------

def test_scrape_over_http_reports_what_the_maps_hold(dp: LxcHarness, pin_root: str) -> None:
    established(dp, 1000)
    dp.egress(tcp(A, 1001, B, 80, "S"))
    dp.egress(udp(A, 5000, B, 53))
    cut = bytes(Ether() / IP(src=A, dst=B, proto=6) / Raw(b"\0" * 10))   # TCP header cut short
    assert dp.egress(cut).reason == "DROP_CT_INVALID_HDR"
    with lb.ServiceTable(pin_root, local_addrs={B}, default_maglev_size=251) as t:
        t.upsert(Service("web", ServiceType.CLUSTER_IP, VIP, 80, backends=(Backend(B, 8080),), source="cli"))

    reg = CollectorRegistry()
    reg.register(collector.DatapathCollector(pin_root))
    server = http.serve("127.0.0.1:0", reg)
    assert server is not None and server.port > 0 and server.address == f"127.0.0.1:{server.port}"
    try:
        body, got = scrape_http(server)
    finally:
        server.stop()

    # Fill levels: every pinned hash map, equal to what the maps hold now.
    reported = {dict(k[1])["map_name"] for k in got if k[0] == "tuplet_bpf_map_entries"}
    assert reported == set(collector.PRESSURE_MAPS)
    for name in collector.PRESSURE_MAPS:
        count, cap = pinned_count(pin_root, name)
        assert got[m("tuplet_bpf_map_entries", map_name=name)] == count, name
        assert got[m("tuplet_bpf_map_capacity", map_name=name)] == cap, name
        assert got[m("tuplet_bpf_map_pressure", map_name=name)] == pytest.approx(count / cap), name
    assert got[m("tuplet_bpf_map_capacity", map_name=CT_MAP_TCP)] == 4096
    assert got[m("tuplet_bpf_map_capacity", map_name=CT_MAP_ANY)] == 2048
    # Two TCP flows: the established one, and the SYN-only one in the handshake table.
    assert got[m("tuplet_bpf_map_entries", map_name=CT_MAP_TCP)] >= 1
    assert got[m("tuplet_bpf_map_entries", map_name=CT_MAP_SYN)] >= 1
    for name in (abi.SERVICES_MAP, abi.BACKENDS_MAP, abi.MAGLEV_MAP):             # the service, incl. map-in-map
        assert got[m("tuplet_bpf_map_entries", map_name=name)] >= 1, name
    assert not any(k[0] == "tuplet_bpf_map_entries" and dict(k[1])["map_name"] == METRICS_MAP for k in got)
    assert "cached" in body and "5s" in body                                 # the HELP says so

    # Verdict counters: as the per-CPU map holds them, summed over CPUs.
    obj = str(object_dir() / OBJ_LXC)
    with open_pinned(pin_root, METRICS_MAP) as mm:
        counters = metrics.read(mm, metrics.reason_names(obj), metrics.direction_names(obj))
    for c in counters:
        assert got[m("tuplet_datapath_verdicts_total", reason=c.reason, direction=c.direction)] == c.packets
    for direction in ("egress", "ingress"):
        passed = [c for c in counters if c.direction == direction and not c.dropped]
        assert got[m("tuplet_forward_count_total", direction=direction)] == sum(c.packets for c in passed) > 0
        assert got[m("tuplet_forward_bytes_total", direction=direction)] == sum(c.bytes for c in passed)
    assert got[m("tuplet_forward_count_total", direction="egress")] == 4     # S, A, S, UDP
    assert got[m("tuplet_forward_count_total", direction="ingress")] == 1    # SA
    assert got[m("tuplet_drop_count_total", reason="DROP_CT_INVALID_HDR", direction="egress")] == 1
    assert got[m("tuplet_drop_bytes_total", reason="DROP_CT_INVALID_HDR", direction="egress")] == len(cut)
    assert sum(v for k, v in got.items() if k[0] == "tuplet_drop_count_total") == 1
    assert got[m("tuplet_datapath_conntrack_insert_failures_total")] == 0


def test_insert_failures_counted_from_their_drop_reason(dp: LxcHarness, pin_root: str) -> None:
    """Only DROP_CT_INSERT_FAILED counts; write its per-CPU counters as the datapath would."""
    names = {v: k for k, v in metrics.reason_names(str(object_dir() / OBJ_LXC)).items()}
    mm = dp.coll.maps[METRICS_MAP]
    per_cpu = bytes(mm.value_buf_size)
    one = (3).to_bytes(8, "little") + (180).to_bytes(8, "little")
    for direction in (0, 1):     # egress, ingress
        idx = direction * abi.TPL_REASON_SLOTS + names[collector.INSERT_FAILED]
        mm.update(idx, one + per_cpu[len(one):])
    got = scrape(_registry(pin_root))
    assert got[m("tuplet_datapath_conntrack_insert_failures_total")] == 6
    assert got[m("tuplet_drop_count_total", reason=collector.INSERT_FAILED, direction="ingress")] == 3
    assert got[m("tuplet_drop_bytes_total", reason=collector.INSERT_FAILED, direction="egress")] == 180


def _registry(pin_root: str, **kw: object) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector.DatapathCollector(pin_root, **kw))  # type: ignore[arg-type]
    return reg


def test_counts_are_reused_for_the_minimum_age(dp: LxcHarness, pin_root: str) -> None:
    now = [100.0]
    reg = _registry(pin_root, count_max_age=5.0, clock=lambda: now[0])
    established(dp, 1000)
    before = scrape(reg)[m("tuplet_bpf_map_entries", map_name=CT_MAP_TCP)]
    established(dp, 1001)
    now[0] += 4.9
    assert scrape(reg)[m("tuplet_bpf_map_entries", map_name=CT_MAP_TCP)] == before        # cached
    now[0] += 0.1
    assert scrape(reg)[m("tuplet_bpf_map_entries", map_name=CT_MAP_TCP)] == before + 1    # counted again
    # Verdict counters are never cached.
    assert scrape(reg)[m("tuplet_forward_count_total", direction="egress")] == 4


def test_a_map_replaced_behind_its_pin_is_never_reported_stale(dp: LxcHarness, pin_root: str) -> None:
    reg = _registry(pin_root, count_max_age=3600)
    established(dp, 1000)
    got = scrape(reg)
    assert got[m("tuplet_bpf_map_capacity", map_name=CT_MAP_TCP)] == 4096
    assert got[m("tuplet_bpf_map_entries", map_name=CT_MAP_TCP)] == 1

    # A live resize: a bigger map takes the pin's place (the old one lives on in the harness).
    old = dp.coll.maps[CT_MAP_TCP]
    new = Map.create(old.info.type, CT_MAP_TCP, old.key_size, old.value_size, 8192)
    try:
        for i in range(3):
            new.update(i.to_bytes(old.key_size, "little"), bytes(old.value_size))
        path = os.path.join(pin_root, CT_MAP_TCP)
        os.unlink(path)
        check(C.bpf_obj_pin(new.fd, cstr(path)), CT_MAP_TCP, "pin")
        got = scrape(reg)
    finally:
        new.close()
    assert got[m("tuplet_bpf_map_capacity", map_name=CT_MAP_TCP)] == 8192
    assert got[m("tuplet_bpf_map_entries", map_name=CT_MAP_TCP)] == 3       # not the cached 1
    assert got[m("tuplet_bpf_map_pressure", map_name=CT_MAP_TCP)] == pytest.approx(3 / 8192)


def test_missing_pins_are_left_out(pin_root: str) -> None:
    got = scrape(_registry(pin_root))            # nothing pinned there
    assert not any(k[0].startswith("tuplet_bpf_map_") for k in got)
    assert got[m("tuplet_datapath_conntrack_insert_failures_total")] == 0


def test_registries_are_separate_and_detect_duplicates(pin_root: str) -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    gc_metrics.GcMetrics(a)
    gc_metrics.GcMetrics(b)                             # another agent (or test) side by side
    a.register(collector.DatapathCollector(pin_root))
    with pytest.raises(ValueError, match="Duplicated"):
        a.register(collector.DatapathCollector(pin_root))
    with pytest.raises(ValueError, match="Duplicated"):
        gc_metrics.GcMetrics(a)


# --- GC metrics -------------------------------------------------------------------------------

@pytest.mark.clock
def test_a_real_gc_pass_feeds_the_gc_metrics(dp: LxcHarness, pin_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GC's clock 100 s ahead of the datapath's: entries with short lifetimes are already expired
    # for it. (Not the datapath's 100 s behind: on a node booted a minute ago that wraps.)
    monkeypatch.setenv(clock.TEST_OFFSET_ENV, str(clock.test_offset() + 100))
    established(dp, 1000)                          # TCP established: alive; related ICMP: expired
    dp.egress(tcp(A, 1001, B, 80, "S"))            # SYN only, 60 s, handshake table: expired
    dp.egress(udp(A, 5000, B, 53))                 # 60 s: expired
    now = clock.monotonic_now()                    # GC's clock: IPv6 entries one alive, two expired
    dp.coll.maps[CT6_MAP_TCP].update(CtTuple6.make("f00d::1", "f00d::2", 80, 1000, 6, 0), CtEntry(lifetime=now + 50))
    for sport in (1, 2):   # the first a DSRInternal entry owning its NAT entry in tpl_nat6_v1
        dp.coll.maps[CT6_MAP_ANY].update(CtTuple6.make("f00d::1", "f00d::2", 53, sport, 17, 0),
                                         CtEntry(lifetime=now - 1, dsr_internal=int(sport == 1)))
    dp.coll.maps[abi.NAT6_MAP].update(CtTuple6.make("f00d::1", "f00d::2", 1, 53, 17, 0), Nat6Entry())

    reg = CollectorRegistry()
    gm = gc_metrics.GcMetrics(reg)
    reg.register(collector.DatapathCollector(pin_root, count_max_age=0))
    maps = [open_pinned(pin_root, n) for n in cttables.NAMES]
    nat = [open_pinned(pin_root, n) for n in cttables.NAT_NAMES]
    try:
        with CtGc(maps, nat=nat) as gc:
            runner = GcRunner(gc, GcSchedule(), on_pass=gm.observe)
            rep = runner.run_pass("start")
            server = http.serve("127.0.0.1:0", reg)
            assert server is not None
            try:
                _, got = scrape_http(server)
                runner.run_pass("interval")
                _, again = scrape_http(server)
            finally:
                server.stop()
    finally:
        for mp in (*maps, *nat):
            mp.close()

    by_map = {s.map: s for s in rep.result.maps}
    assert by_map[CT_MAP_TCP].deleted == 0 and by_map[CT_MAP_TCP].alive == 1
    assert by_map[CT_MAP_SYN].deleted == 1 and by_map[CT_MAP_SYN].alive == 0
    assert by_map[CT_MAP_ANY].deleted >= 1
    assert (by_map[CT6_MAP_TCP].alive, by_map[CT6_MAP_ANY].deleted, by_map[CT6_MAP_ANY].nat_deleted) == (1, 2, 1)
    assert got[m("tuplet_bpf_map_entries", map_name=abi.NAT6_MAP)] == 0
    for name, family, proto in ((CT_MAP_TCP, "ipv4", "TCP"), (CT_MAP_ANY, "ipv4", "non-TCP"),
                                (CT6_MAP_TCP, "ipv6", "TCP"), (CT6_MAP_ANY, "ipv6", "non-TCP")):
        s = by_map[name]
        lab = {"family": family, "protocol": proto}
        assert got[m("tuplet_datapath_conntrack_gc_runs_total", status="completed", **lab)] == 1
        assert got[m("tuplet_datapath_conntrack_gc_entries", status="alive", **lab)] == s.alive
        assert got[m("tuplet_datapath_conntrack_gc_entries", status="deleted", **lab)] == s.deleted
        assert got[m("tuplet_datapath_conntrack_gc_deleted_total", **lab)] == s.deleted
        assert got[m("tuplet_datapath_conntrack_gc_nat_deleted_total", **lab)] == s.nat_deleted
        assert got[m("tuplet_datapath_conntrack_gc_duration_seconds_count", status="completed", **lab)] == 1
        assert got[m("tuplet_datapath_conntrack_gc_duration_seconds_sum", status="completed", **lab)] == \
            pytest.approx(s.duration)
        assert got[m("tuplet_datapath_conntrack_gc_duration_seconds_bucket", status="completed", le="+Inf",
                     **lab)] == 1
        # After the pass the table holds what GC left alive.
        assert got[m("tuplet_bpf_map_entries", map_name=name)] == s.alive
        # A second pass: nothing left to delete, runs counted on.
        assert again[m("tuplet_datapath_conntrack_gc_runs_total", status="completed", **lab)] == 2
        assert again[m("tuplet_datapath_conntrack_gc_entries", status="deleted", **lab)] == 0
        assert again[m("tuplet_datapath_conntrack_gc_entries", status="alive", **lab)] == s.alive
    assert got[m("tuplet_datapath_conntrack_gc_interval_seconds")] == rep.interval > 0
    assert got[m("tuplet_datapath_conntrack_gc_passes_total", reason="start")] == 1
    assert again[m("tuplet_datapath_conntrack_gc_passes_total", reason="interval")] == 1


def test_a_failed_pass_counts_as_uncompleted() -> None:
    reg = CollectorRegistry()
    gc_metrics.GcMetrics(reg).failed(duration=0.5)
    got = scrape(reg)
    for family, proto in itertools.product(("ipv4", "ipv6"), ("TCP", "non-TCP", "TCP-handshake")):
        lab = {"family": family, "protocol": proto, "status": "uncompleted"}
        assert got[m("tuplet_datapath_conntrack_gc_runs_total", **lab)] == 1
        assert got[m("tuplet_datapath_conntrack_gc_duration_seconds_sum", **lab)] == 0.5


# --- the endpoint -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, want", [
    (":9962", ("", 9962)), ("127.0.0.1:9962", ("127.0.0.1", 9962)), ("[::1]:9962", ("::1", 9962)),
    ("[::]:0", ("::", 0)), ("localhost:80", ("localhost", 80)), ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("", None),
])
def test_serve_addresses(value: str, want: tuple[str, int] | None) -> None:
    assert http.parse_addr(value) == want


@pytest.mark.parametrize("value, why", [
    ("here:port", "port 'port'"), ("9962", "no ':'"), (":65536", "port '65536'"), (":-1", "port '-1'"),
    ("::1:9962", "needs brackets"), ("[::1]9962", "followed by :PORT"), ("[nope]:1", "not an IPv6"),
    ("[::1]:", "port ''"), ("999.1.1.1:80", "not an IPv4"), ("a b:80", "not an address"), (" :80", "not an"),
])
def test_malformed_serve_addresses_name_the_flag(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        http.parse_addr(value)
    assert e.value.key == "--prometheus-serve-addr"
    assert str(e.value).startswith("--prometheus-serve-addr: ") and repr(value) in str(e.value) and why in str(e.value)
    with pytest.raises(ConfigError):
        http.serve(value, CollectorRegistry())


def test_empty_address_disables_the_endpoint() -> None:
    assert http.serve("", CollectorRegistry()) is None


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_all_addresses_and_stop(pin_root: str) -> None:
    reg = CollectorRegistry()
    gc_metrics.GcMetrics(reg).interval.set(42)
    server = http.serve(":0", reg)
    assert server is not None and server.address == f":{server.port}"
    try:
        assert scrape_http(server)[1][m("tuplet_datapath_conntrack_gc_interval_seconds")] == 42
        if _has_ipv6_loopback():
            assert scrape_http(server, "::1")[1][m("tuplet_datapath_conntrack_gc_interval_seconds")] == 42
    finally:
        server.stop()
    server.stop()                                      # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_address() -> None:
    server = http.serve("[::1]:0", CollectorRegistry())
    assert server is not None
    try:
        assert server.address == f"[::1]:{server.port}"
        scrape_http(server, "::1")
    finally:
        server.stop()


def test_busy_port_says_which_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(TupletError) as e:
            http.serve(f"127.0.0.1:{port}", CollectorRegistry())
    assert not isinstance(e.value, ConfigError)
    assert f"127.0.0.1:{port}" in str(e.value) and "EADDRINUSE" in str(e.value)
    assert "--prometheus-serve-addr" in str(e.value)


# --- the dashboard ----------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or labels."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                    # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                                 # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)   # label lists
    e = re.sub(r"\$\w+", "", e)                                     # Grafana variables
    names = set()
    for mt in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if mt.group(2) is None and mt.group(1).lower() not in _KEYWORDS:
            names.add(mt.group(1))
    return names


def test_promql_name_parser() -> None:
    assert promql_metric_names('histogram_quantile(0.9, sum by (le, protocol) (rate(x_bucket{a="b,c}"}[5m])))') \
        == {"x_bucket"}
    assert promql_metric_names("sum without (instance) (a_total) / on (job) group_left b + 1e3") == {"a_total", "b"}


def exported_names() -> set[str]:
    """Sample names the agent's metrics can carry, from the families themselves."""
    reg = CollectorRegistry()
    gc_metrics.GcMetrics(reg)
    fams = [*reg.collect(), *collector.DatapathCollector("/nonexistent").describe()]
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + s for f in fams for s in suffixes[f.type]}


def _panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def test_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in dash["templating"]["list"])
    exported = exported_names()
    used: set[str] = set()
    panels = list(_panels(dash["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = promql_metric_names(t["expr"])
            assert names, (p["title"], t["expr"])
            assert names <= exported, (p["title"], names - exported)
            used |= names
    for v in dash["templating"]["list"]:
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else q or ""
        for name in re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,", q):
            assert name in exported, name
    assert {"tuplet_bpf_map_pressure", "tuplet_bpf_map_entries", "tuplet_bpf_map_capacity",
            "tuplet_datapath_conntrack_gc_runs_total", "tuplet_datapath_conntrack_gc_duration_seconds_bucket",
            "tuplet_datapath_conntrack_gc_entries", "tuplet_datapath_conntrack_gc_interval_seconds",
            "tuplet_drop_count_total", "tuplet_datapath_conntrack_insert_failures_total"} <= used


def test_reason_names_fall_back_to_the_object_without_map_btf(dp: LxcHarness, pin_root: str) -> None:
    """Names come from the counter map's BTF; a map without BTF is named from the object file."""
    old = dp.coll.maps[METRICS_MAP]
    new = Map.create(old.info.type, METRICS_MAP, old.key_size, old.value_size, old.max_entries)
    try:
        assert new.info.btf_id == 0
        row = (2).to_bytes(8, "little") + (120).to_bytes(8, "little")
        new.update(129, row + bytes(new.value_buf_size - len(row)))          # egress, reason 129
        path = os.path.join(pin_root, METRICS_MAP)
        os.unlink(path)
        check(C.bpf_obj_pin(new.fd, cstr(path)), METRICS_MAP, "pin")
        got = scrape(_registry(pin_root))
    finally:
        new.close()
    assert got[m("tuplet_drop_count_total", reason="DROP_CT_INVALID_HDR", direction="egress")] == 2
    assert not any(k[0] == "tuplet_forward_count_total" for k in got)
