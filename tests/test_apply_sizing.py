"""Map sizes reach the real pinned maps through `apply`, are recorded, and `status` shows them.

No namespaces or endpoints: `apply` with no interfaces loads and pins the object only.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import pytest

from tuplet.bpf import _libbpf as C
from tuplet.bpf.maps import Map
from tuplet.cli import main as cli
from tuplet.conntrack.sizing import CT_ANY_MIN, CT_TCP_MIN, GIB, NAT_MIN, Sizing
from tuplet.core.errors import IncompatiblePinError
from tuplet.datapath import cttables
from tuplet.datapath.abi import CT6_MAP_ANY, CT6_MAP_SYN, CT6_MAP_TCP, CT_MAP_ANY, CT_MAP_SYN, CT_MAP_TCP, NAT_MAP
from tuplet.datapath.layouts import CtTuple4, Nat4Entry
from tuplet.node import apply as node_apply
from tuplet.node import config, state

Apply = Callable[[str], config.NodeConfig]


def text(pin_root: str, conntrack: str) -> str:
    return f'[node]\nname = "sizing"\npin_root = "{pin_root}"\n\n[lb]\nsocket_lb = false\n\n[conntrack]\n{conntrack}\n'


@pytest.fixture
def applied(pin_root: str) -> Iterator[Apply]:
    def apply(conntrack: str) -> config.NodeConfig:
        cfg = config.parse(text(pin_root, conntrack))
        node_apply.apply(cfg)
        return cfg

    yield apply
    node_apply.teardown(pin_root)   # also after a failed re-apply: the first one pinned


def pinned_sizes(pin_root: str) -> tuple[int, int, int]:
    out = []
    for name in (CT_MAP_TCP, CT_MAP_ANY, *cttables.NAT_NAMES):
        with Map.from_pin(f"{pin_root}/{name}") as m:
            out.append(m.max_entries)
    assert out[3] == out[2], "nat_max sizes both NAT tables"
    return (out[0], out[1], out[2])


def recorded(pin_root: str) -> Sizing:
    st = state.load(pin_root)
    assert st is not None and st.sizing is not None
    return Sizing.from_json(st.sizing)


def test_explicit_sizes_reach_the_pinned_maps(applied: Apply, pin_root: str) -> None:
    applied("tcp_max = 2048\nany_max = 1024\nnat_max = 1536")
    assert pinned_sizes(pin_root) == (2048, 1024, 1536)
    sz = recorded(pin_root)
    assert [(m.entries, m.source) for m in sz.maps()] == [(2048, "explicit"), (1024, "explicit"),
                                                          (1536, "explicit")]
    st = state.load(pin_root)
    assert st is not None and st.gc == {"interval": 0, "max_interval": 0}


def test_ratio_zero_gives_static_nat_from_the_ct_sizes(applied: Apply, pin_root: str) -> None:
    applied("tcp_max = 2048\nany_max = 1024\nmap_dynamic_size_ratio = 0")
    assert pinned_sizes(pin_root) == (2048, 1024, 2048)   # (2048 + 1024) x 2/3
    sz = recorded(pin_root)
    assert not sz.dynamic and sz.nat.source == "default"


def test_dynamic_sizes_from_node_memory(applied: Apply, pin_root: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A 7.5 GiB node: the published table's first row (every map at its minimum),
    # except the non-TCP table, set explicitly.
    monkeypatch.setattr(config, "node_memory_bytes", lambda: int(7.5 * GIB))
    applied("any_max = 4096")
    assert pinned_sizes(pin_root) == (CT_TCP_MIN, 4096, NAT_MIN)
    sz = recorded(pin_root)
    assert (sz.tcp.source, sz.any.source, sz.nat.source) == ("dynamic", "explicit", "dynamic")
    assert sz.mem_total == int(7.5 * GIB) and CT_ANY_MIN == 65536


def test_other_size_is_resized_live_keeping_the_entries(applied: Apply, pin_root: str, tmp_path, capsys) -> None:
    applied("tcp_max = 2048\nany_max = 1024\nnat_max = 1024")
    key = CtTuple4.make("10.64.0.36", "10.64.0.64", 80, 40000, 6, 0)
    with Map.from_pin(f"{pin_root}/{NAT_MAP}") as nat, Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as tcp:
        nat.update(key, Nat4Entry(created=7, to_port=80))
        old_nat, old_tcp = nat.info.id, tcp.info.id
    cfg = tmp_path / "node.toml"
    cfg.write_text(text(pin_root, "tcp_max = 2048\nany_max = 1024\nnat_max = 4096"))
    assert cli.main(["apply", str(cfg)]) == 0
    assert "resized tpl_nat4_v1: 1024 -> 4096 entries, 1 copied, 0 dropped" in capsys.readouterr().out
    assert pinned_sizes(pin_root) == (2048, 1024, 4096)
    assert recorded(pin_root).nat.entries == 4096        # the record describes the new pins
    with Map.from_pin(f"{pin_root}/{NAT_MAP}") as nat, Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as tcp:
        assert nat.info.id != old_nat and tcp.info.id == old_tcp   # only the resized map is new
        assert nat.info.btf_id != 0 and nat.info.name == NAT_MAP
        e = Nat4Entry.from_buffer_copy(nat.lookup(key))
        assert (e.created, e.to_port) == (7, 80)
    assert not [p for p in os.listdir(pin_root) if p.startswith("resize-")]


def test_other_layout_is_refused_and_the_pins_kept(applied: Apply, pin_root: str) -> None:
    applied("tcp_max = 2048\nany_max = 1024\nnat_max = 1024")
    # A NAT map of another layout (value 48 bytes) where the datapath's is pinned.
    os.unlink(f"{pin_root}/{NAT_MAP}")
    with Map.create(C.BPF_MAP_TYPE_LRU_HASH, NAT_MAP, 14, 48, 1024) as other:
        assert C.bpf_obj_pin(other.fd, f"{pin_root}/{NAT_MAP}".encode()) == 0
        other_id = other.info.id
    with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as tcp:
        tcp_id = tcp.info.id
    pins = sorted(os.listdir(pin_root))
    # The TCP table would be resized, but nothing changes while another pin is refused.
    with pytest.raises(IncompatiblePinError, match="value size: pinned 48, wanted 40"):
        applied("tcp_max = 4096\nany_max = 1024\nnat_max = 4096")
    assert pinned_sizes(pin_root) == (2048, 1024, 1024)
    with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as tcp, Map.from_pin(f"{pin_root}/{NAT_MAP}") as nat:
        assert (tcp.info.id, nat.info.id) == (tcp_id, other_id)
    assert sorted(os.listdir(pin_root)) == pins
    assert recorded(pin_root).tcp.entries == 2048        # the record still describes the pins


def test_cli_flags_size_the_maps_and_status_shows_them(pin_root: str, tmp_path, capsys) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(text(pin_root, "tcp_max = 4096\nany_max = 2048\ngc_max_interval = \"1h\""))
    try:
        # Flags override the file (any_max), add to it (nat_max), and set GC settings.
        assert cli.main(["apply", str(cfg), "--bpf-ct-global-any-max", "1024", "--bpf-nat-global-max=2048",
                         "--conntrack-gc-interval", "2m0s"]) == 0
        assert pinned_sizes(pin_root) == (4096, 1024, 2048)
        capsys.readouterr()

        assert cli.main(["--pin-root", pin_root, "status"]) == 0
        out = capsys.readouterr().out
        assert "BPF Maps:     dynamic sizing: on (ratio: 0.002500)" in out
        assert "Derivation" not in out and "Conntrack GC" not in out

        assert cli.main(["--pin-root", pin_root, "status", "--verbose"]) == 0
        out = capsys.readouterr().out.splitlines()
        start = out.index("BPF Maps:   dynamic sizing: on (ratio: 0.002500)")
        assert out[start + 1:start + 5] == [
            "  Name                          Size",
            "  Non-TCP connection tracking   1024",
            "  TCP connection tracking       4096",
            "  NAT                           2048",
        ]
        assert "    NAT: explicit, --bpf-nat-global-max=2048" in out
        assert ("    IPv6 tables: tpl_ct6_v1 as tpl_ct4_v1, tpl_ct_any6_v1 as tpl_ct_any4_v1, "
                "tpl_ct6_syn_v1 as tpl_ct4_syn_v1, tpl_nat6_v1 as tpl_nat4_v1") in out
        tables = [line.split() for line in out[out.index("Tables:") + 1:] if line.startswith("  tpl_ct")]
        assert {t[0]: t[3] for t in tables} == {CT_MAP_TCP: "4096", CT_MAP_ANY: "1024", CT_MAP_SYN: "1024",
                                                CT6_MAP_TCP: "4096", CT6_MAP_ANY: "1024", CT6_MAP_SYN: "1024"}
        gc_line = [line for line in out if line.startswith("Conntrack GC: ")]
        assert gc_line == ["Conntrack GC: interval fixed 2m0s, max 1h0m0s; "
                           "early passes on failed inserts, at most one per 10s"]

        assert cli.main(["--pin-root", pin_root, "status", "-o", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert {m["name"]: m["entries"] for m in doc["sizing"]["maps"]} == {
            "TCP connection tracking": 4096, "Non-TCP connection tracking": 1024, "NAT": 2048}
        assert doc["sizing"]["dynamic"] is True and doc["sizing"]["ratio"] == 0.0025
        assert doc["gc"] == {"mode": "fixed", "interval": 120.0, "max_interval": 3600.0, "early_min_gap": 10.0}
        assert {t["map"]: (t["max_entries"], t.get("family")) for t in doc["tables"]} == {
            CT_MAP_TCP: (4096, "ipv4"), CT_MAP_ANY: (1024, "ipv4"), CT_MAP_SYN: (1024, "ipv4"), NAT_MAP: (2048, "ipv4"),
            CT6_MAP_TCP: (4096, "ipv6"), CT6_MAP_ANY: (1024, "ipv6"), CT6_MAP_SYN: (1024, "ipv6"),
            cttables.NAT_NAMES[1]: (2048, "ipv6")}
    finally:
        node_apply.teardown(pin_root)


def test_bad_flag_exits_2_naming_it_and_changes_nothing(pin_root: str, tmp_path, capsys) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(text(pin_root, ""))
    for argv, msg in (
        (["--bpf-ct-global-tcp-max", "12"], "--bpf-ct-global-tcp-max: must be between 1024 and 16777216, got 12"),
        (["--bpf-map-dynamic-size-ratio", "2"], "--bpf-map-dynamic-size-ratio: must be a number between 0 and 1"),
        (["--conntrack-gc-interval", "soon"], "--conntrack-gc-interval: invalid duration 'soon'"),
    ):
        assert cli.main(["apply", str(cfg), *argv]) == 2
        assert msg in capsys.readouterr().err
    cfg.write_text(text(pin_root, "nat_max = 12"))
    assert cli.main(["apply", str(cfg)]) == 2
    assert "config conntrack.nat_max: must be between 1024 and 16777216, got 12" in capsys.readouterr().err
    assert state.load(pin_root) is None
    assert not os.path.exists(pin_root)
