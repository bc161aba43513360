"""node_exporter-compatible conntrack metrics (``node_nf_conntrack_*``), so the dashboards
and the kubernetes-mixin alert written for nf_conntrack work on a node where tuplet's
tables do the tracking (`tuplet agent --metrics-node-exporter-compat=false` turns them off).

* ``node_nf_conntrack_entries{map_name}`` / ``node_nf_conntrack_entries_limit{map_name}``:
  entries and max_entries of each main CT table (``tpl_ct4_v1``, ``tpl_ct_any4_v1``). One
  series per table, so ``node_nf_conntrack_entries / node_nf_conntrack_entries_limit > 0.75``
  fires when either table is three quarters full (one table full is what drops flows).
  The handshake table is left out: a SYN flood fills it by design
  (``tuplet_bpf_map_pressure{map_name="tpl_ct4_syn_v1"}`` has it).
* ``node_nf_conntrack_stat_*`` (gauges, as node_exporter exports them; summed over CPUs):
  the columns of :mod:`tuplet.conntrack.stats` (found, invalid, insert, insert_failed, drop),
  ``early_drop`` and ``search_restart`` always 0 (nf_conntrack internals tuplet has no
  counterpart for).
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from tuplet.conntrack.stats import CpuStats
from tuplet.datapath.abi import CT_MAP_ANY, CT_MAP_TCP

TABLES = (CT_MAP_TCP, CT_MAP_ANY)
STATS = {
    "found": "packets that found their conntrack entry (PASS_CT_ESTABLISHED, _REPLY, _RELATED, _REOPENED)",
    "invalid": "packets dropped as malformed (DROP_INVALID_L3, DROP_CT_INVALID_HDR)",
    "insert": "entries inserted into the CT tables (insert_tcp + insert_syn + insert_any events)",
    "insert_failed": "new flows whose CT insert was refused (insert_failed event)",
    "drop": "packets the datapath dropped, every reason",
    "early_drop": "always 0: nf_conntrack's early drop has no tuplet counterpart (LRU evictions: "
                  "tuplet_datapath_conntrack_evictions_estimated_total)",
    "search_restart": "always 0: nf_conntrack's hash-resize lookup restarts have no tuplet counterpart",
}


def families(entries: dict[str, tuple[int, int]], total: CpuStats | None) -> Iterator[Metric]:
    """``entries``: map name -> (entries, max_entries) of the pinned CT tables;
    ``total``: the datapath's counters summed over CPUs (None: not pinned)."""
    e = GaugeMetricFamily("node_nf_conntrack_entries", "Entries in a tuplet conntrack table "
                          "(node_exporter-compatible; one series per table)", labels=["map_name"])
    lim = GaugeMetricFamily("node_nf_conntrack_entries_limit", "Maximum entries of a tuplet conntrack "
                            "table (node_exporter-compatible)", labels=["map_name"])
    for name in TABLES:
        if name in entries:
            n, cap = entries[name]
            e.add_metric([name], n)
            lim.add_metric([name], cap)
    yield e
    yield lim
    for col, meaning in STATS.items():
        g = GaugeMetricFamily(f"node_nf_conntrack_stat_{col}", f"tuplet: {meaning} (node_exporter-compatible)")
        if total is not None:
            g.add_metric([], total.columns.get(col, 0))
        yield g


def describe() -> Iterator[Metric]:
    yield from families({}, None)
