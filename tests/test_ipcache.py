"""The ipcache: CT_INGRESS entries of traffic from a remote address carry the identity of
its prefix; a local endpoint's identity wins; an address in no prefix is world (2)."""
from __future__ import annotations

import ipaddress
import json

import pytest

from endpoint_harness import records, tuplet
from traffic import start_server, tcp_once
from tuplet.core.errors import ConfigError
from tuplet.datapath import abi, paths
from tuplet.datapath.layouts import Ipcache6Key, IpcacheInfo
from tuplet.lab.topology import Topology
from tuplet.node import apply as node_apply
from tuplet.node import config
from two_pods import POD1, POD2, node_config_text

pytestmark = pytest.mark.netns

EXT, NODE_IP = "192.168.77.2", "192.168.77.1"


@pytest.fixture
def topo(pin_root):
    with Topology() as t:
        node = t.add_node("node")
        t.add_pod(node, "pod1", POD1)
        t.add_pod(node, "pod2", POD2)
        t.node = node
        t.p1, t.p2 = node.pods
        t.ext = t.add_external(node, "ext", EXT, node_ip=NODE_IP, node_ifname="eth0")
        text = node_config_text(t, pin_root) + '\n[[ipcache]]\nprefix = "192.168.77.0/24"\nidentity = 3096\n' \
            '\n[[ipcache]]\nprefix = "10.64.0.0/16"\nidentity = 9\n'
        node_apply.apply(config.parse(text))
        try:
            yield t
        finally:
            node_apply.teardown(pin_root)


def in_entry_from(pin_root: str, src: str):
    hits = [r for r in records(pin_root) if r.direction == "IN" and not r.related and r.src[0] == src
            and r.proto == "TCP"]
    assert len(hits) == 1, [r.line() for r in records(pin_root)]
    return hits[0]


def test_remote_identity_on_ct_ingress(topo, pin_root) -> None:
    srv = start_server(topo, topo.p1, 8000)
    try:
        tcp_once(topo, topo.ext, POD1, 8000)
        assert in_entry_from(pin_root, EXT).entry.src_sec_id == 3096
        assert "SourceSecurityID=3096" in in_entry_from(pin_root, EXT).line()
        tcp_once(topo, topo.p2, POD1, 8000)
        assert in_entry_from(pin_root, POD2).entry.src_sec_id == 4122       # local endpoint wins
        listed = json.loads(tuplet(pin_root, "ipcache", "list", "-o", "json").stdout)
        assert {(e["prefix"], e["identity"], e["source"]) for e in listed} == {
            ("10.64.0.0/16", 9, "config"), ("192.168.77.0/24", 3096, "config")}
        # A longer prefix from the CLI wins for new flows; the file's entries stay.
        tuplet(pin_root, "ipcache", "add", f"{EXT}/32", "--identity", "777")
        tuplet(pin_root, "ct", "flush")
        tcp_once(topo, topo.ext, POD1, 8000)
        assert in_entry_from(pin_root, EXT).entry.src_sec_id == 777
        r = tuplet(pin_root, "ipcache", "delete", "192.168.77.0/24", check=False)
        assert r.returncode == 2 and "node file" in r.stderr
        tuplet(pin_root, "ipcache", "delete", f"{EXT}/32")
        # Re-apply without the [[ipcache]] tables: the file's entries go, a CLI one stays.
        tuplet(pin_root, "ipcache", "add", "10.99.0.0/16", "--identity", "55")
        node_apply.apply(config.parse(node_config_text(topo, pin_root)))
        listed = json.loads(tuplet(pin_root, "ipcache", "list", "-o", "json").stdout)
        assert [(e["prefix"], e["source"]) for e in listed] == [("10.99.0.0/16", "cli")]
        tuplet(pin_root, "ct", "flush")
        tcp_once(topo, topo.ext, POD1, 8000)
        assert in_entry_from(pin_root, EXT).entry.src_sec_id == 2                # world
    finally:
        srv.kill()
        srv.wait()


def test_config_checks() -> None:
    for bad, key in [('prefix = "10.0.0.0/33"\nidentity = 5', "ipcache[0].prefix"),
                     ('prefix = "f00d::/129"\nidentity = 5', "ipcache[0].prefix"),
                     ('prefix = "f00d::1::/64"\nidentity = 5', "ipcache[0].prefix"),
                     ('prefix = "10.0.0.0/8"\nidentity = 0', "ipcache[0].identity"),
                     ('prefix = "10.0.0.0/8"', "ipcache[0].identity"),
                     ('prefix = "10.0.0.0/8"\nidentity = 5\ncolor = 1', "ipcache[0].color")]:
        with pytest.raises(ConfigError) as e:
            config.parse(f"[[ipcache]]\n{bad}\n")
        assert e.value.key == key


def ipcache6(pin_root: str) -> dict[tuple[int, bytes], int]:
    """tpl_ipcache6_v1 as raw (prefix length, address) -> identity."""
    with paths.open_pinned(pin_root, abi.IPCACHE6_MAP) as m:
        return {(k.prefixlen, bytes(k.addr)): IpcacheInfo.from_buffer_copy(m.lookup(raw)).sec_id
                for raw in list(m.keys()) for k in [Ipcache6Key.from_buffer_copy(raw)]}


def test_ipv6_prefixes_go_to_the_ipv6_trie(topo, pin_root) -> None:
    v6 = ipaddress.IPv6Address
    tuplet(pin_root, "ipcache", "add", "FD00:77::5", "--identity", "700")          # a bare address: /128
    tuplet(pin_root, "ipcache", "add", "fd00:77::/48", "--identity", "701")
    assert ipcache6(pin_root) == {(128, v6("fd00:77::5").packed): 700, (48, v6("fd00:77::").packed): 701}
    listed = json.loads(tuplet(pin_root, "ipcache", "list", "-o", "json").stdout)
    assert [(e["prefix"], e["identity"], e["source"]) for e in listed] == [
        ("10.64.0.0/16", 9, "config"), ("192.168.77.0/24", 3096, "config"),
        ("fd00:77::/48", 701, "cli"), ("fd00:77::5/128", 700, "cli")]
    # Bad input: named, nothing changed.
    for prefix in ("fd00:77::/129", "fd00:77::1::2", "10.0.0.0/33"):
        r = tuplet(pin_root, "ipcache", "add", prefix, "--identity", "5", check=False)
        assert r.returncode == 2 and "must be an IPv4 or IPv6 prefix" in r.stderr and prefix in r.stderr
    assert len(json.loads(tuplet(pin_root, "ipcache", "list", "-o", "json").stdout)) == 4
    tuplet(pin_root, "ipcache", "delete", "fd00:77::5")
    # The node file's IPv6 prefixes: programmed by apply, owned by the file.
    node_apply.apply(config.parse(node_config_text(topo, pin_root)
                                  + '\n[[ipcache]]\nprefix = "fd00:88::1/64"\nidentity = 88\n'))
    assert ipcache6(pin_root) == {(48, v6("fd00:77::").packed): 701, (64, v6("fd00:88::").packed): 88}
    r = tuplet(pin_root, "ipcache", "delete", "fd00:88::/64", check=False)
    assert r.returncode == 2 and "node file" in r.stderr
    node_apply.apply(config.parse(node_config_text(topo, pin_root)))
    assert ipcache6(pin_root) == {(48, v6("fd00:77::").packed): 701}
