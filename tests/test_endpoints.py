"""Live endpoints: `tuplet endpoint add/delete/list` on a running datapath, with real
traffic; delete flushes that endpoint's entries and nothing else."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import time

import pytest

from endpoint_harness import POD3, records, tcp_exchange, three_pods_applied, tuplet, with_addr
from traffic import start_server, tcp_once, udp_once
from tuplet.bpf.links import Hook, attached_prog_id
from tuplet.datapath import abi, paths
from tuplet.datapath.clock import monotonic_now
from tuplet.datapath.layouts import CtEntry, CtTuple4, CtTuple6, EndpointInfo
from tuplet.node import apply as node_apply
from tuplet.node import endpoints, netns, state
from two_pods import POD1, POD2

pytestmark = pytest.mark.netns


@pytest.fixture
def topo(pin_root):
    yield from three_pods_applied(pin_root)


def prog_ids(pin_root: str, topo) -> dict[tuple[str, str], int]:
    st = state.load(pin_root)
    with netns.enter(topo.node.netns):
        return {(a.ifname, a.hook.value): attached_prog_id(a) for a in st.attachments}


def plant_expired(pin_root: str, src: str, dst: str) -> CtTuple4:
    """An expired CT_EGRESS entry of another flow (GC's business, not the flush's)."""
    key = CtTuple4.make(src, dst, 9999, 40000, socket.IPPROTO_TCP, abi.TUPLE_F_OUT)
    with paths.open_pinned(pin_root, abi.CT_MAP_TCP) as m:
        m.update(key, CtEntry(lifetime=max(1, monotonic_now() - 100), src_sec_id=3096))
    return key


def test_add_delete_with_traffic_flushes_only_its_entries(topo, pin_root) -> None:
    before = prog_ids(pin_root, topo)
    out = tuplet(pin_root, "endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, "--ipv4", POD3,
                 "--identity", "5000").stdout
    assert "added endpoint pod3" in out
    after = prog_ids(pin_root, topo)
    assert {k: v for k, v in after.items() if k[0] != topo.p3.host_ifname} == before   # others untouched
    assert {k for k in after if k[0] == topo.p3.host_ifname} == {(topo.p3.host_ifname, h.value) for h in Hook}

    srv = start_server(topo, topo.p1, 8000)
    try:
        tcp_once(topo, topo.p3, POD1, 8000)
        udp_once(topo, topo.p3, POD1, 8000, 40123)
        topo.run(topo.p3, ["ping", "-c", "1", "-W", "2", POD1], check=True, capture_output=True)
        tcp_once(topo, topo.p2, POD1, 8000)     # another pod's flow: stays
    finally:
        srv.kill()
        srv.wait()
    stale = plant_expired(pin_root, POD2, POD1)
    recs = records(pin_root)
    mine = with_addr(recs, POD3)
    kinds = {(r.proto, r.direction, r.related) for r in mine}
    assert {("TCP", "OUT", False), ("TCP", "IN", False), ("UDP", "OUT", False), ("ICMP", "OUT", False),
            } <= kinds and any(r.related for r in mine), [r.line() for r in mine]
    assert all(r.entry.src_sec_id == 5000 for r in mine if r.direction == "OUT" and r.src[0] == POD3)
    others = [r for r in recs if r not in mine]
    assert others

    # A live endpoint survives a re-apply of the node file, with this build's programs.
    node_apply.apply(topo.cfg)
    st = state.load(pin_root)
    assert st.live["pod3"].source == "cli" and sum(a.ifname == topo.p3.host_ifname for a in st.attachments) == 2
    reloaded = {k: v for k, v in prog_ids(pin_root, topo).items() if k[0] != topo.p3.host_ifname}

    r = tuplet(pin_root, "endpoint", "delete", "pod3", "-o", "json")
    res = json.loads(r.stdout)
    assert res["flushed"]["ct_deleted"] == len(mine)
    left = records(pin_root)
    assert not with_addr(left, POD3)
    assert sorted(x.line() for x in left) == sorted(x.line() for x in others)
    with paths.open_pinned(pin_root, abi.CT_MAP_TCP) as m:
        assert m.lookup(stale) is not None     # expired, unrelated: left for GC
    st = state.load(pin_root)
    assert "pod3" not in st.live and not any(a.ifname == topo.p3.host_ifname for a in st.attachments)
    assert not os.path.exists(os.path.join(pin_root, "links", f"{topo.p3.host_ifname}-ingress"))
    assert prog_ids(pin_root, topo) == reloaded
    with paths.open_pinned(pin_root, abi.EP_MAP) as m:
        assert m.lookup(socket.inet_aton(POD3)) is None


def test_refusals_name_the_holder(topo, pin_root) -> None:
    r = tuplet(pin_root, "endpoint", "add", "x", "--ifname", topo.p1.host_ifname, "--ipv4", POD3, check=False)
    assert r.returncode == 2 and "taken by endpoint 'pod1' (from config)" in r.stderr, r.stderr
    r = tuplet(pin_root, "endpoint", "add", "x", "--ifname", topo.p3.host_ifname, "--ipv4", POD2, check=False)
    assert r.returncode == 2 and f"address {POD2} is taken by endpoint 'pod2'" in r.stderr, r.stderr
    r = tuplet(pin_root, "endpoint", "add", "x", "--ifname", "nosuchif0", "--ipv4", POD3, check=False)
    assert r.returncode == 1 and "nosuchif0" in r.stderr
    tuplet(pin_root, "endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, "--ipv4", POD3)
    r = tuplet(pin_root, "endpoint", "add", "again", "--ifname", "lo", "--ipv4", POD3, check=False)
    assert r.returncode == 2 and "taken by endpoint 'pod3' (from cli)" in r.stderr, r.stderr
    r = tuplet(pin_root, "endpoint", "delete", "pod1", check=False)
    assert r.returncode == 2 and "from the node file" in r.stderr
    listed = {e["name"]: e for e in json.loads(tuplet(pin_root, "endpoint", "list", "-o", "json").stdout)}
    assert {n: e["source"] for n, e in listed.items()} == {"pod1": "config", "pod2": "config", "pod3": "cli"}
    assert all(e["in_datapath"] for e in listed.values())
    status = tuplet(pin_root, "status").stdout
    assert "pod3" in status and "from cli" in status and "from config" in status
    tuplet(pin_root, "endpoint", "delete", "pod3")


def test_not_applied(pin_root) -> None:
    r = tuplet(pin_root, "endpoint", "add", "x", "--ifname", "lo", "--ipv4", POD3, check=False)
    assert r.returncode == 1 and "not applied" in r.stderr


def test_teardown_removes_live_endpoints(topo, pin_root) -> None:
    tuplet(pin_root, "endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, "--ipv4", POD3)
    node_apply.teardown(pin_root)
    with netns.enter(topo.node.netns):
        for h in Hook:
            assert not os.path.exists(os.path.join(pin_root, "links", f"{topo.p3.host_ifname}-{h.value}"))
    assert state.load(pin_root) is None
    time.sleep(0)


POD3_V6, POD1_V6, OTHER_V6 = "f00d::3", "f00d::1", "f00d::2"


def plant6(pin_root: str, table: str, src: str, dst: str, sport: int, proto: int) -> None:
    key = CtTuple6.make(src, dst, 80, sport, proto, abi.TUPLE_F_OUT)
    with paths.open_pinned(pin_root, table) as m:
        m.update(key, CtEntry(lifetime=monotonic_now() + 100))


def test_dual_stack_endpoint_maps_both_addresses_and_its_delete_flushes_both_families(topo, pin_root) -> None:
    out = tuplet(pin_root, "endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, "--ipv4", POD3,
                 "--ipv6", "F00D:0::3", "--identity", "5000").stdout
    assert f"added endpoint pod3: {topo.p3.host_ifname} {POD3} {POD3_V6} identity 5000" in out
    ifindex = endpoints.map_entries(pin_root)[POD3].ifindex
    with paths.open_pinned(pin_root, abi.EP6_MAP) as m:
        got = EndpointInfo.from_buffer_copy(m.lookup(ipaddress.IPv6Address(POD3_V6).packed))
    assert (got.ifindex, got.sec_id) == (ifindex, 5000)
    listed = {e["name"]: e for e in json.loads(tuplet(pin_root, "endpoint", "list", "-o", "json").stdout)}
    assert listed["pod3"]["ipv6"] == POD3_V6 and listed["pod3"]["in_datapath"]
    assert f"{POD3} {POD3_V6}" in tuplet(pin_root, "endpoint", "list").stdout

    for sport, (table, proto) in enumerate([(abi.CT6_MAP_TCP, 6), (abi.CT6_MAP_ANY, 17), (abi.CT6_MAP_SYN, 6)]):
        plant6(pin_root, table, POD3_V6, POD1_V6, 1000 + sport, proto)     # pod3's
        plant6(pin_root, table, POD1_V6, POD3_V6, 2000 + sport, proto)     # to pod3: also pod3's
        plant6(pin_root, table, OTHER_V6, POD1_V6, 3000 + sport, proto)    # another pod's: stays
    tcp_exchange(topo, topo.p3, POD1)                                      # pod3's IPv4 entries
    recs = records(pin_root)
    mine = with_addr(recs, POD3) + with_addr(recs, POD3_V6)
    assert len([r for r in mine if r.family.value == "ipv6"]) == 6 and len(mine) > 6
    others = sorted(r.line() for r in recs if r not in mine)

    res = json.loads(tuplet(pin_root, "endpoint", "delete", "pod3", "-o", "json").stdout)
    assert res["flushed"]["ct_deleted"] == len(mine)
    assert res["flushed"]["deleted"][abi.CT6_MAP_TCP] == 2 and res["flushed"]["deleted"][abi.CT6_MAP_ANY] == 2
    assert sorted(r.line() for r in records(pin_root)) == others
    with paths.open_pinned(pin_root, abi.EP6_MAP) as m:
        assert m.lookup(ipaddress.IPv6Address(POD3_V6).packed) is None
    with paths.open_pinned(pin_root, abi.EP_MAP) as m:
        assert m.lookup(socket.inet_aton(POD3)) is None


def test_ipv6_only_endpoint_and_bad_addresses_change_nothing(topo, pin_root) -> None:
    def now() -> tuple[object, ...]:
        eps = {a: bytes(e) for a, e in endpoints.map_entries(pin_root).items()}
        return prog_ids(pin_root, topo), eps, state.load(pin_root).live

    before = now()
    for argv, msg in (
        (["--ipv6", POD3], f"--ipv6: not an IPv6 address: '{POD3}'"),
        (["--ipv4", POD3_V6], f"--ipv4: not an IPv4 address: '{POD3_V6}'"),
        (["--ipv4", POD3, "--ipv6", "f00d::3/64"], "--ipv6: not an IPv6 address: 'f00d::3/64'"),
        (["--ipv6", "::1"], "--ipv6: ::1 cannot be a pod address"),
        ([], "an endpoint needs an IPv4 or an IPv6 address"),
        (["--ipv6", POD1_V6, "--ipv4", POD2], f"address {POD2} is taken by endpoint 'pod2'"),
    ):
        r = tuplet(pin_root, "endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, *argv, check=False)
        assert r.returncode == 2 and msg in r.stderr, (argv, r.stderr)
        assert now() == before

    tuplet(pin_root, "endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, "--ipv6", POD3_V6)
    assert POD3_V6 in endpoints.map_entries(pin_root) and POD3 not in endpoints.map_entries(pin_root)
    r = tuplet(pin_root, "endpoint", "add", "x", "--ifname", "lo", "--ipv6", POD3_V6, check=False)
    assert r.returncode == 2 and f"address {POD3_V6} is taken by endpoint 'pod3' (from cli)" in r.stderr
    plant6(pin_root, abi.CT6_MAP_TCP, POD3_V6, POD1_V6, 1000, 6)
    res = json.loads(tuplet(pin_root, "endpoint", "delete", "pod3", "-o", "json").stdout)
    assert res["flushed"]["deleted"][abi.CT6_MAP_TCP] == 1 and POD3_V6 not in endpoints.map_entries(pin_root)
