"""node_exporter-compatible node_nf_conntrack_* metrics of the agent's collector, against a
datapath pinned under a test pin root with packets run through the programs."""
from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry

from lxc_harness import LxcHarness, tcp, udp
from test_prom import A, B, dp, established, m, pinned_count, scrape  # noqa: F401  (dp: fixture)
from tuplet.agent import collector
from tuplet.cli import main as cli
from tuplet.datapath.abi import CT_MAP_ANY, CT_MAP_SYN, CT_MAP_TCP


def registry(pin_root: str, **kw: bool) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector.DatapathCollector(pin_root, count_max_age=0, **kw))
    return reg


def test_entries_limit_and_stats_per_table(dp: LxcHarness, pin_root: str) -> None:  # noqa: F811
    established(dp, 1000)                      # new 1, found 2, promoted -> TCP table (+ ICMP twin)
    dp.egress(tcp(A, 1001, B, 80, "S"))        # new: handshake table only
    dp.egress(udp(A, 5000, B, 53))             # new: any table
    got = scrape(registry(pin_root))
    for table in (CT_MAP_TCP, CT_MAP_ANY):
        n, cap = pinned_count(pin_root, table)
        assert got[m("node_nf_conntrack_entries", map_name=table)] == n
        assert got[m("node_nf_conntrack_entries_limit", map_name=table)] == cap
    assert got[m("node_nf_conntrack_entries", map_name=CT_MAP_TCP)] == 1
    assert got[m("node_nf_conntrack_entries", map_name=CT_MAP_ANY)] == 2   # UDP + the related twin
    assert m("node_nf_conntrack_entries", map_name=CT_MAP_SYN) not in got  # a SYN flood fills it by design
    assert got[m("node_nf_conntrack_stat_found")] == 2
    assert got[m("node_nf_conntrack_stat_insert")] == 5    # syn x2, promotion, twin, UDP
    assert got[m("node_nf_conntrack_stat_insert_failed")] == 0
    assert got[m("node_nf_conntrack_stat_drop")] == 0 and got[m("node_nf_conntrack_stat_invalid")] == 0
    assert got[m("node_nf_conntrack_stat_early_drop")] == 0 and got[m("node_nf_conntrack_stat_search_restart")] == 0
    # the mixin's expression reads per table
    ratio = got[m("node_nf_conntrack_entries", map_name=CT_MAP_TCP)] / \
        got[m("node_nf_conntrack_entries_limit", map_name=CT_MAP_TCP)]
    assert 0 < ratio < 0.75


def test_off_switch(dp: LxcHarness, pin_root: str) -> None:  # noqa: F811
    established(dp, 1000)
    got = scrape(registry(pin_root, node_exporter_compat=False))
    assert not [k for k in got if k[0].startswith("node_nf_conntrack")]
    assert m("tuplet_bpf_map_entries", map_name=CT_MAP_TCP) in got


def test_flag_is_parsed_and_a_bad_value_named() -> None:
    args = cli.parser().parse_args(["agent", "--metrics-node-exporter-compat=false"])
    assert args.metrics_node_exporter_compat is False
    assert cli.parser().parse_args(["agent"]).metrics_node_exporter_compat is True
    r = subprocess.run([sys.executable, "-m", "tuplet.cli", "agent", "--metrics-node-exporter-compat=maybe"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--metrics-node-exporter-compat: must be true or false, got 'maybe'" in r.stderr
