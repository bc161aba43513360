"""The datapath attached to real veths in namespaces, with real sockets between pods."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from traffic import LiveConnection, start_server, tcp_once, udp_once
from tuplet.bpf import _libbpf as C
from tuplet.bpf.links import AttachMode, Hook, attached_prog_id, tc_has_filter
from tuplet.bpf.maps import Map
from tuplet.cli import main as cli
from tuplet.conntrack import records as ct
from tuplet.core.errors import IncompatiblePinError, NotFoundError
from tuplet.datapath import abi, paths
from tuplet.node import apply as node_apply
from tuplet.node import config, netns, state
from two_pods import POD1, POD2, node_config_text, two_pods

pytestmark = pytest.mark.netns



@pytest.fixture
def topo():
    yield from two_pods()


def node_config(topo, pin_root: str, mode: str = "auto", tcp_max: int = 8192, extra: str = "") -> str:
    return node_config_text(topo, pin_root, mode=mode, conntrack=f"tcp_max = {tcp_max}\nany_max = 4096\n{extra}")


@pytest.fixture
def applied(topo, pin_root):
    created = []

    def apply(mode: str = "auto", **kw) -> config.NodeConfig:
        cfg = config.parse(node_config(topo, pin_root, mode, **kw))
        node_apply.apply(cfg)
        created.append(cfg)
        return cfg

    yield apply
    if created:
        node_apply.teardown(pin_root)


def ct_lines(pin_root: str, tables: tuple[str, ...] = abi.CT_MAPS) -> list[ct.CtRecord]:
    """Every entry of the pinned ``tables`` (the IPv4 ones unless told)."""
    out = []
    for name in tables:
        with paths.open_pinned(pin_root, name) as m:
            out.extend(ct.records(m))
    return out


def find(recs, proto: str, direction: str, related: bool = False, sport: int | None = None):
    hits = [r for r in recs if r.proto == proto and r.direction == direction and r.related == related
            and (sport is None or r.src[1] == sport)]
    assert len(hits) == 1, [r.line() for r in recs]
    return hits[0]


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_pod_to_pod_entries_as_in_seed(topo, applied, pin_root, mode) -> None:
    applied(mode)
    st = state.load(pin_root)
    assert {a.mode for a in st.attachments} == {AttachMode(mode)}
    assert len(st.attachments) == 4
    if mode == "tc":
        with netns.enter(topo.node.netns):
            assert tc_has_filter(topo.p1.host_ifname, Hook.INGRESS)
            assert tc_has_filter(topo.p2.host_ifname, Hook.EGRESS)
    else:
        assert sorted(os.listdir(Path(pin_root) / "links")) == sorted(
            f"{p.host_ifname}-{h}" for p in (topo.p1, topo.p2) for h in ("ingress", "egress"))

    srv = start_server(topo, topo.p2, 8000)
    conn = LiveConnection(topo, topo.p1, POD2, 8000)
    assert conn.roundtrip("hello") == "hello"
    conn.close()
    udp_once(topo, topo.p1, POD2, 8000, 40001)
    topo.run(topo.p1, ["ping", "-c", "1", POD2], check=True, capture_output=True)
    time.sleep(0.3)   # the final ACK of the close
    srv.kill()

    recs = ct_lines(pin_root)
    out = find(recs, "TCP", "OUT", sport=conn.sport)
    inn = find(recs, "TCP", "IN", sport=conn.sport)
    for r in (out, inn):
        line = r.line()
        assert line.startswith(f"TCP {r.direction} {POD1}:{conn.sport} -> {POD2}:8000 expires=")
        assert "RxFlagsSeen=0x1b" in line and "TxFlagsSeen=0x1b" in line
        assert "Flags=0x0013 [ RxClosing TxClosing SeenNonSyn ] RevNAT=0 SourceSecurityID=3096" in line
        assert r.entry.lifetime == max(r.entry.last_rx_report, r.entry.last_tx_report) + 10
        assert "Packets=0 Bytes=0" in line   # accounting off by default, as the seed's lines
    u = find(recs, "UDP", "OUT", sport=40001)
    assert u.dst == (POD2, 8000) and u.entry.packets == 0 and u.entry.src_sec_id == 3096
    find(recs, "UDP", "IN", sport=40001)
    find(recs, "ICMP", "OUT", related=True)
    find(recs, "ICMP", "IN", related=True)
    assert len([r for r in recs if r.proto == "ICMP" and not r.related]) == 2   # echo OUT + IN


def test_reload_keeps_entries_and_connections(topo, applied, pin_root) -> None:
    applied("tcx", extra="accounting = true")   # the counters show which programs ran
    srv = start_server(topo, topo.p2, 8000)
    conn = LiveConnection(topo, topo.p1, POD2, 8000)
    assert conn.roundtrip("before") == "before"
    before = find(ct_lines(pin_root), "TCP", "OUT", sport=conn.sport)

    applied("tcx", extra="accounting = true")   # reload: maps reused through their pins, programs swapped
    after = find(ct_lines(pin_root), "TCP", "OUT", sport=conn.sport)
    assert after.entry.packets == before.entry.packets
    assert conn.roundtrip("after") == "after"
    again = find(ct_lines(pin_root), "TCP", "OUT", sport=conn.sport)
    assert again.entry.packets > before.entry.packets
    assert again.entry.lifetime >= before.entry.lifetime
    conn.close()
    srv.kill()


def test_switching_tcx_to_tc_and_back(topo, applied, pin_root) -> None:
    applied("tcx")
    srv = start_server(topo, topo.p2, 8000)
    applied("tc")
    tcp_once(topo, topo.p1, POD2, 8000)
    # A TCX link and a TC filter would each track: one attachment per hook only.
    assert not (Path(pin_root) / "links").exists() or not os.listdir(Path(pin_root) / "links")
    applied("tcx")
    with netns.enter(topo.node.netns):
        assert not tc_has_filter(topo.p1.host_ifname, Hook.INGRESS)
    tcp_once(topo, topo.p1, POD2, 8000)
    srv.kill()


def test_missing_interface_changes_nothing(topo, pin_root) -> None:
    text = node_config(topo, pin_root).replace(topo.p2.host_ifname, "lxc-nothere")
    with pytest.raises(NotFoundError, match="lxc-nothere.*nothing was changed"):
        node_apply.apply(config.parse(text))
    assert state.load(pin_root) is None
    assert not any(Path(pin_root).iterdir()) if Path(pin_root).exists() else True
    with netns.enter(topo.node.netns):
        assert not tc_has_filter(topo.p1.host_ifname, Hook.INGRESS)


def test_incompatible_pin_is_refused_and_running_datapath_kept(topo, applied, pin_root) -> None:
    applied("tcx", tcp_max=4096)
    srv = start_server(topo, topo.p2, 8000)
    conn = LiveConnection(topo, topo.p1, POD2, 8000)
    conn.roundtrip("x")
    # Another layout pinned where the NAT table is (a size change alone is a live resize).
    os.unlink(f"{pin_root}/{abi.NAT_MAP}")
    with Map.create(C.BPF_MAP_TYPE_LRU_HASH, abi.NAT_MAP, 14, 48, 1024) as other:
        assert C.bpf_obj_pin(other.fd, f"{pin_root}/{abi.NAT_MAP}".encode()) == 0
    with pytest.raises(IncompatiblePinError, match="value size: pinned 48, wanted 40"):
        node_apply.apply(config.parse(node_config(topo, pin_root, "tcx", tcp_max=8192)))
    with Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}") as m:
        assert m.max_entries == 4096     # not resized either
    assert conn.roundtrip("still") == "still"
    find(ct_lines(pin_root), "TCP", "OUT", sport=conn.sport)
    conn.close()
    srv.kill()


def test_missing_netns_is_a_clear_error(pin_root, tmp_path, capsys) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nnetns = "tpl-no-such-ns"\npin_root = "{pin_root}"\n')
    assert cli.main(["apply", str(cfg)]) == 1
    assert "network namespace 'tpl-no-such-ns'" in capsys.readouterr().err


def test_teardown_leaves_nothing(topo, pin_root) -> None:
    for mode in ("tcx", "tc"):
        node_apply.apply(config.parse(node_config(topo, pin_root, mode)))
        st = state.load(pin_root)
        assert st is not None
        with netns.enter(topo.node.netns):
            ours = {attached_prog_id(a) for a in st.attachments}
        assert ours and 0 not in ours
        node_apply.teardown(pin_root)
        assert not Path(pin_root).exists()
        assert state.load(pin_root) is None
        with netns.enter(topo.node.netns):
            for p in (topo.p1, topo.p2):
                assert not tc_has_filter(p.host_ifname, Hook.INGRESS)
                assert not tc_has_filter(p.host_ifname, Hook.EGRESS)
        qd = subprocess.run(["ip", "-n", topo.node.netns, "-j", "qdisc", "show"], capture_output=True, text=True)
        assert "clsact" not in qd.stdout
        # The programs this apply attached are freed (release is asynchronous). Only these ids
        # are checked: other tests' namespaces may still be in the kernel's cleanup queue.
        deadline = time.time() + 10
        while _loaded_prog_ids() & ours and time.time() < deadline:
            time.sleep(0.1)
        assert not _loaded_prog_ids() & ours, f"programs {sorted(_loaded_prog_ids() & ours)} outlived teardown"


def _loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {int(p["id"]) for p in json.loads(out.stdout)}


def test_cli_apply_list_teardown(topo, pin_root, tmp_path, capsys) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_config(topo, pin_root, "tcx"))
    # Flags override the file: any_max 4096 -> 2048, NAT set explicitly, a timeout.
    assert cli.main(["apply", str(cfg), "--bpf-ct-global-any-max", "2048", "--bpf-nat-global-max=3072",
                     "--bpf-ct-timeout-regular-any", "2m0s"]) == 0
    with Map.from_pin(f"{pin_root}/tpl_ct_any4_v1") as m, Map.from_pin(f"{pin_root}/tpl_nat4_v1") as n:
        assert (m.max_entries, n.max_entries) == (2048, 3072)
    capsys.readouterr()
    assert cli.main(["--pin-root", pin_root, "status", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "BPF Maps:   dynamic sizing: on (ratio: 0.002500)" in out
    assert "Non-TCP connection tracking" in out and "explicit, --bpf-ct-global-any-max=2048" in out
    assert "TCP connection tracking: explicit, --bpf-ct-global-tcp-max=8192" in out
    assert "Conntrack GC: interval adaptive" in out
    srv = start_server(topo, topo.p2, 8000)
    tcp_once(topo, topo.p1, POD2, 8000)
    srv.kill()
    capsys.readouterr()
    assert cli.main(["--pin-root", pin_root, "ct", "list", "-o", "json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert {(r["proto"], r["direction"]) for r in recs} >= {("TCP", "OUT"), ("TCP", "IN")}
    assert cli.main(["--pin-root", pin_root, "ct", "list", "--time-diff"]) == 0
    assert "(remaining: " in capsys.readouterr().out
    assert cli.main(["--pin-root", pin_root, "ct", "gc"]) == 0
    # kernel (the sliced iterator) where the kernel allows iter/bpf_map_elem, else batch
    assert re.search(r"gc pass \((kernel|batch)\): 0 deleted", capsys.readouterr().out)
    # The scheduled loop: a pass at start, then waits on the schedule and the signal ring.
    follow = subprocess.Popen([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "ct", "gc",
                               "--follow", "--conntrack-gc-interval", "1h"], stdout=subprocess.PIPE, text=True)
    first = follow.stdout.readline()
    assert "fixed, next in 3600s" in first and "early passes on datapath signals: on" in first
    assert re.match(r"gc pass \(start, (kernel|batch)\)", follow.stdout.readline())
    follow.terminate()
    rest, _ = follow.communicate(timeout=10)
    assert follow.returncode == 0 and "stopped after 1 pass(es)" in rest
    assert cli.main(["--pin-root", pin_root, "ct", "gc", "--follow", "--conntrack-gc-interval=-5s"]) == 2
    dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{pin_root}/tpl_ct4_v1"],
                          capture_output=True, text=True, check=True)
    first = json.loads(dump.stdout)[0]["formatted"]   # BTF: named struct fields
    assert set(first["key"]) == {"daddr", "saddr", "dport", "sport", "nexthdr", "flags"}
    assert {"lifetime", "rx_closing", "seen_non_syn", "tx_flags_seen", "src_sec_id"} <= set(first["value"])
    assert cli.main(["--config", str(cfg), "teardown"]) == 0
    assert not Path(pin_root).exists()


def test_bad_config_names_the_key(tmp_path, capsys) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[endpoints]]\nifname = "lxc1"\nipv4 = "10.0.0.300"\n')
    assert cli.main(["apply", str(cfg)]) == 2
    assert "endpoints[0].ipv4" in capsys.readouterr().err
