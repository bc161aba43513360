"""IPv6 conntrack between dual-stack pods (issue 18): real TCP, UDP and ICMPv6 over IPv6 through
the datapath attached to the pods' veths, read back from the pinned IPv6 tables.

The pods are the two-pod topology with IPv6 beside IPv4 (tests/two_pods.py, dual_stack): each
pod reaches the other through the node, its default gateway fe80::1 resolved by neighbour
discovery through the attached programs, so every test also shows ND passing them.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from test_netns_datapath import applied, ct_lines, find  # noqa: F401 (applied: fixture)
from traffic import LiveConnection, start_server, udp_once
from tuplet.bpf.maps import Map
from tuplet.conntrack import records as ct
from tuplet.datapath import abi, clock
from tuplet.datapath.abi import CT6_MAP_ANY, CT6_MAP_TCP
from tuplet.datapath.layouts import Lb6Backend, bytes_to_ip6
from tuplet.lab.topology import GATEWAY6
from two_pods import POD1_V6, POD2_V6, two_pods

pytestmark = [pytest.mark.netns, pytest.mark.clock]

POD1_ID = 3096    # pod1's identity (two_pods.node_config_text), found by its IPv6 address
COUNTING = "accounting = true"   # [conntrack]: tests that read Packets (off by default)


@pytest.fixture
def topo():
    yield from two_pods(dual_stack=True)


def ct6(pin_root: str) -> list[ct.CtRecord]:
    return ct_lines(pin_root, abi.CT6_MAPS)


def show(recs: list[ct.CtRecord]) -> list[str]:
    return [f"{r.map_name}: {r.line()}" for r in recs]


def tcp_packets(pin_root: str) -> dict[tuple[str, int], int]:
    """(direction, client port) -> packets of the entries in the IPv6 TCP table."""
    return {(r.direction, r.src[1]): r.entry.packets for r in ct6(pin_root) if r.map_name == CT6_MAP_TCP}


def on_link_only(addr: str) -> bool:
    ip = ipaddress.IPv6Address(addr)
    return ip.is_link_local or ip.is_multicast or ip.is_unspecified


def flush_neighbours(topo) -> None:
    """Forget every IPv6 neighbour, so the next packets resolve them again through the programs."""
    for host in (topo.node, topo.p1, topo.p2):
        topo.run(host, ["ip", "-6", "neigh", "flush", "all"], check=True, capture_output=True)


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_pod_to_pod_ipv6_entries(topo, applied, pin_root, mode) -> None:  # noqa: F811
    applied(mode, extra=COUNTING)
    exchange_and_check(topo, pin_root)


def exchange_and_check(topo, pin_root: str) -> None:
    """TCP, UDP and ping over IPv6 from pod1 to pod2 through the applied datapath, each with its
    entries in the IPv6 tables, no other entry anywhere (the VM suite runs it on 6.1 too)."""
    flush_neighbours(topo)
    srv = start_server(topo, topo.p2, 8000, family6=True)
    conn = LiveConnection(topo, topo.p1, POD2_V6, 8000)
    assert conn.roundtrip("hello") == "hello"
    conn.close()
    udp_once(topo, topo.p1, POD2_V6, 8000, 40001)
    topo.run(topo.p1, ["ping", "-6", "-c", "1", "-W", "2", POD2_V6], check=True, capture_output=True)
    time.sleep(0.3)   # the final ACK of the close
    srv.kill()

    recs = ct6(pin_root)
    for direction in ("OUT", "IN"):
        r = find(recs, "TCP", direction, sport=conn.sport)
        e, line = r.entry, r.line()
        assert r.map_name == CT6_MAP_TCP and r.dst == (POD2_V6, 8000)
        assert line.startswith(f"TCP {direction} [{POD1_V6}]:{conn.sport} -> [{POD2_V6}]:8000 expires="), line
        assert "RxFlagsSeen=0x1b" in line and "TxFlagsSeen=0x1b" in line, line
        assert f"Flags=0x0013 [ RxClosing TxClosing SeenNonSyn ] RevNAT=0 SourceSecurityID={POD1_ID}" in line, line
        assert e.lifetime == max(e.last_rx_report, e.last_tx_report) + 10
        assert e.packets >= 6
    for direction in ("OUT", "IN"):
        u = find(recs, "UDP", direction, sport=40001)
        assert u.map_name == CT6_MAP_ANY and u.dst == (POD2_V6, 8000) and u.entry.packets == 2
        assert u.entry.src_sec_id == POD1_ID
    # ICMPv6: the echo (OUT and IN, by identifier) and the related entries of the flows.
    echo = [r for r in recs if r.proto == "ICMPv6" and not r.related]
    assert sorted(r.direction for r in echo) == ["IN", "OUT"], show(recs)
    assert all(r.map_name == CT6_MAP_ANY for r in echo)
    find(recs, "ICMPv6", "OUT", related=True)
    find(recs, "ICMPv6", "IN", related=True)
    # Neighbour discovery ran (gateway and pods resolved) and left nothing: every entry is
    # between the two pods' addresses, and there are no others.
    assert "lladdr" in topo.run(topo.p1, ["ip", "-6", "neigh", "show", GATEWAY6], capture_output=True,
                                text=True).stdout
    assert not [r for r in recs if on_link_only(r.src[0]) or on_link_only(r.dst[0])], show(recs)
    assert {(r.src[0], r.dst[0]) for r in recs} == {(POD1_V6, POD2_V6)}, show(recs)
    assert len(recs) == 8, show(recs)
    # None of this traffic is in the IPv4 tables.
    assert ct_lines(pin_root) == []


# Every neighbour discovery and router message once, as a host on the link sends it (hop limit
# 255, link-layer options); argv: interface, source address, a neighbour's address on the link.
ND_SENDER = textwrap.dedent("""
    import socket, sys
    from scapy.arch import get_if_hwaddr
    from scapy.layers.inet6 import (ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_Redirect, ICMPv6ND_RS,
                                    ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6)
    from scapy.layers.l2 import Ether
    from scapy.sendrecv import sendp
    from scapy.utils6 import in6_getnsma, in6_getnsmac
    iface, src, target = sys.argv[1:4]
    mac = get_if_hwaddr(iface)
    sol = in6_getnsma(socket.inet_pton(socket.AF_INET6, target))
    ll = ICMPv6NDOptSrcLLAddr(lladdr=mac)
    def to(dst6):   # Ether with the multicast MAC of dst6
        return Ether(src=mac, dst=in6_getnsmac(socket.inet_pton(socket.AF_INET6, dst6))) / \
            IPv6(src=src, dst=dst6, hlim=255)
    pkts = [
        to(socket.inet_ntop(socket.AF_INET6, sol)) / ICMPv6ND_NS(tgt=target) / ll,
        to("ff02::1") / ICMPv6ND_NA(tgt=src, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=mac),
        to("ff02::2") / ICMPv6ND_RS() / ll,
        to("ff02::1") / ICMPv6ND_RA(routerlifetime=0) / ll,
        to("ff02::1") / ICMPv6ND_Redirect(tgt=src, dst=target),
    ]
    sendp(pkts, iface=iface, verbose=False)
    print("sent", len(pkts))
""")


def icmp6_in(topo, host) -> dict[str, int]:
    """The host's Icmp6In* counters (/proc/net/snmp6 of its namespace)."""
    text = topo.run(host, ["cat", "/proc/net/snmp6"], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in text.splitlines()) if k.startswith("Icmp6In")}


def test_neighbour_discovery_and_router_messages_pass_untracked(topo, applied, pin_root) -> None:  # noqa: F811
    """NS, NA, RS, RA and redirect sent by a pod (through cil_from_container) and by the node to
    the pod (through cil_to_container) all arrive, and none leaves an entry."""
    applied("tcx")
    kinds = ("Icmp6InNeighborSolicits", "Icmp6InNeighborAdvertisements", "Icmp6InRouterSolicits",
             "Icmp6InRouterAdvertisements", "Icmp6InRedirects")
    for sender, receiver, iface, src6, peer in (
            (topo.p1, topo.node, topo.p1.ifname, POD1_V6, GATEWAY6),
            (topo.node, topo.p1, topo.p1.host_ifname, GATEWAY6, POD1_V6)):
        before = icmp6_in(topo, receiver)
        r = topo.run(sender, [sys.executable, "-c", ND_SENDER, iface, src6, peer], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "sent 5", r.stderr
        # A pod is not a router: it has not joined ff02::2, its stack drops the RS uncounted.
        expected = kinds if receiver is topo.node else [k for k in kinds if k != "Icmp6InRouterSolicits"]
        deadline = time.monotonic() + 5
        while True:
            after = icmp6_in(topo, receiver)
            missing = [k for k in expected if after[k] <= before[k]]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not missing, f"{sender.netns} -> {receiver.netns}: not received {missing}"
    assert ct6(pin_root) == [], show(ct6(pin_root))
    assert ct_lines(pin_root) == []


def gc_later(pin_root: str, seconds: int) -> dict[str, object]:
    """`tuplet ct gc -o json` run with the datapath's clock ``seconds`` ahead of the programs'."""
    env = dict(os.environ, **{clock.TEST_OFFSET_ENV: str(clock.test_offset() + seconds)})
    r = subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "ct", "gc", "-o", "json"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    res: dict[str, object] = json.loads(r.stdout)
    return res


def test_gc_of_ipv6_tables_keeps_live_connections(topo, applied, pin_root) -> None:  # noqa: F811
    applied("tcx")
    srv = start_server(topo, topo.p2, 8000, family6=True)
    conns = [LiveConnection(topo, topo.p1, POD2_V6, 8000) for _ in range(3)]
    for c in conns:
        assert c.roundtrip("x") == "x"
    udp_once(topo, topo.p1, POD2_V6, 8000, 40002)
    find(ct6(pin_root), "UDP", "OUT", sport=40002)

    # Two minutes on: the UDP flow (60 s) has expired, the established connections (8000 s) not.
    res = gc_later(pin_root, 120)
    per_map = {m["map"]: m for m in res["maps"]}  # type: ignore[attr-defined]
    assert per_map[CT6_MAP_ANY]["deleted"] >= 2, res
    assert per_map[CT6_MAP_TCP]["deleted"] == 0, res
    recs = ct6(pin_root)
    assert not [r for r in recs if r.proto == "UDP"], show(recs)
    for c in conns:
        for direction in ("OUT", "IN"):
            find(recs, "TCP", direction, sport=c.sport)
        assert c.roundtrip("after gc") == "after gc"
        c.close()
    srv.kill()


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_live_resize_of_ipv6_tables_keeps_connections(topo, applied, pin_root, mode) -> None:  # noqa: F811
    applied(mode, tcp_max=4096, extra=COUNTING)
    srv = start_server(topo, topo.p2, 8000, family6=True)
    conns = [LiveConnection(topo, topo.p1, POD2_V6, 8000) for _ in range(3)]
    for c in conns:
        assert c.roundtrip("x") == "x"
    before = tcp_packets(pin_root)
    assert len(before) == 6, before

    for size in (16384, 2048):     # grow, then shrink above the live count
        applied(mode, tcp_max=size, extra=COUNTING)
        with Map.from_pin(f"{pin_root}/{CT6_MAP_TCP}") as m:
            assert m.max_entries == size
        kept = tcp_packets(pin_root)
        assert kept.keys() == before.keys() and all(kept[k] >= before[k] for k in before), (before, kept)
        for c in conns:
            assert c.roundtrip(f"after {size}") == f"after {size}"
        now = tcp_packets(pin_root)
        assert all(now[k] > kept[k] for k in before), (kept, now)    # the new tables are the ones used
        before = now
    for c in conns:
        c.close()
    srv.kill()


VIP6 = "fd00:10:96::a"


def test_ipv6_cluster_ip_with_a_local_backend(topo, applied, pin_root) -> None:  # noqa: F811
    """An IPv6 ClusterIP whose backend is pod2's IPv6 address: apply counts the endpoints'
    IPv6 addresses as local (the backend is not marked remote), and pod1 reaches the backend
    through the VIP per packet, with the service's entries in the IPv6 tables."""
    applied("tcx", extra=textwrap.dedent(f"""
        [[services]]
        name = "web6"
        type = "ClusterIP"
        address = "{VIP6}"
        port = 80
        backends = ["[{POD2_V6}]:8000"]
        """))
    with Map.from_pin(f"{pin_root}/{abi.BACKENDS6_MAP}") as m:
        backends = [Lb6Backend.from_buffer_copy(v) for _, v in m.items()]
    assert [(bytes_to_ip6(b.address), b.flags) for b in backends] == [(POD2_V6, 0)]
    flush_neighbours(topo)
    srv = start_server(topo, topo.p2, 8000, family6=True)
    try:
        conn = LiveConnection(topo, topo.p1, VIP6, 80)
        assert conn.roundtrip("via the VIP") == "via the VIP"
        conn.close()
    finally:
        srv.kill()
    lines = show(ct6(pin_root))
    assert any(" SVC " in line and f"[{VIP6}]:80" in line for line in lines), lines
