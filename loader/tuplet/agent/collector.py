"""Prometheus metrics of the node agent, named and labelled like the reference's
(``cilium_X`` is ``tuplet_X``), so existing dashboards port by renaming.

* :class:`DatapathCollector` reads the pinned maps of one pin root at scrape time: how
  full each hash map is, and the datapath's verdict counters (``tpl_metrics_v2``).
  Maps are opened on every scrape, so a map replaced behind its pin (a live resize) is
  never reported stale. Counting a hash map's entries walks it (O(entries)), so counts
  are kept for ``count_max_age`` seconds (default 5) unless the pin's map id changes.
  Also the datapath's conntrack event counters (``tpl_ct_events_v2``: inserts per
  table, promotions out of the handshake table, refused inserts).

Everything registers with a caller-given :class:`CollectorRegistry`, never the global one.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from tuplet.agent import node_compat
from tuplet.bpf.maps import Map
from tuplet.conntrack import sentinels
from tuplet.conntrack import stats as ctstats
from tuplet.core.errors import TupletError
from tuplet.datapath import abi, cttables, enums, metrics
from tuplet.datapath import events as ct_events
from tuplet.datapath.abi import (
    EP6_MAP,
    EP_MAP,
    LB_MAPS,
    METRICS_MAP,
    OBJ_LXC,
)
from tuplet.datapath.paths import object_path

log = structlog.get_logger("tuplet.prom")

DEFAULT_COUNT_MAX_AGE = 5.0
#: Maps whose fill level is reported, when pinned. Only hash maps are (an array is always full).
PRESSURE_MAPS = (*cttables.NAMES, *cttables.NAT_NAMES, EP_MAP, EP6_MAP, *LB_MAPS)
INSERT_FAILED = "DROP_CT_INSERT_FAILED"



# --- the datapath's maps, read at scrape time ---------------------------------------------------

@dataclass
class _Count:
    map_id: int
    at: float
    entries: int


@dataclass
class _Families:
    """One scrape's metric families of the datapath collector."""

    entries: GaugeMetricFamily
    capacity: GaugeMetricFamily
    pressure: GaugeMetricFamily
    verdicts: CounterMetricFamily
    drops: CounterMetricFamily
    drop_bytes: CounterMetricFamily
    forwards: CounterMetricFamily
    forward_bytes: CounterMetricFamily
    insert_failures: CounterMetricFamily
    ct_events: CounterMetricFamily

    @classmethod
    def make(cls, count_max_age: float) -> "_Families":
        age = f"{count_max_age:g}s"
        rd = ["reason", "direction"]
        return cls(
            entries=GaugeMetricFamily(
                "tuplet_bpf_map_entries", "Entries in a pinned BPF hash map (counted by walking the map; "
                f"the count is reused for up to {age} unless the map behind the pin changes)",
                labels=["map_name"]),
            capacity=GaugeMetricFamily(
                "tuplet_bpf_map_capacity", "Maximum entries of a pinned BPF hash map", labels=["map_name"]),
            pressure=GaugeMetricFamily(
                "tuplet_bpf_map_pressure", "Fill level of a pinned BPF hash map, entries / capacity "
                f"(as cilium_bpf_map_pressure; entries cached up to {age})", labels=["map_name"]),
            verdicts=CounterMetricFamily(
                "tuplet_datapath_verdicts", "Packets by datapath verdict reason and direction", labels=rd),
            drops=CounterMetricFamily(
                "tuplet_drop_count", "Packets dropped by the datapath, by reason and direction", labels=rd),
            drop_bytes=CounterMetricFamily(
                "tuplet_drop_bytes", "Bytes dropped by the datapath, by reason and direction", labels=rd),
            forwards=CounterMetricFamily(
                "tuplet_forward_count", "Packets the datapath passed, by direction", labels=["direction"]),
            forward_bytes=CounterMetricFamily(
                "tuplet_forward_bytes", "Bytes the datapath passed, by direction", labels=["direction"]),
            insert_failures=CounterMetricFamily(
                "tuplet_datapath_conntrack_insert_failures",
                f"Packets dropped because a conntrack entry could not be inserted ({INSERT_FAILED})"),
            ct_events=CounterMetricFamily(
                "tuplet_datapath_conntrack_events",
                "What the conntrack tables went through, as the datapath counts it: insert_tcp, insert_syn, "
                "insert_any (new entries per table), promoted (handshake table to tpl_ct4_v1), "
                "promote_failed, insert_failed (a new flow refused)", labels=["event"]),
        )

    def all(self) -> list[Metric]:
        return [getattr(self, f.name) for f in fields(self)]


class DatapathCollector:
    """Map fill levels and verdict counters of the datapath pinned under ``pin_root``.

    ``count_max_age``: seconds an entry count is reused (0: count at every scrape).
    ``obj_path``: the object naming the verdict reasons when the counter map has no BTF.
    """

    def __init__(self, pin_root: str, count_max_age: float = DEFAULT_COUNT_MAX_AGE,
                 obj_path: str | None = None, clock: Callable[[], float] = time.monotonic,
                 node_exporter_compat: bool = True) -> None:
        self.pin_root = pin_root
        self.node_exporter_compat = node_exporter_compat
        self._caps: dict[str, int] = {}
        self.count_max_age = count_max_age
        self.obj_path = obj_path
        self.clock = clock
        self._counts: dict[str, _Count] = {}
        self._lock = threading.Lock()
        self._names_by_btf: dict[tuple[int, enums.EnumSpec], dict[int, str]] = {}

    def describe(self) -> Iterator[Metric]:
        """The families without samples (lets the registry detect clashing names)."""
        yield from _Families.make(self.count_max_age).all()
        if self.node_exporter_compat:
            yield from node_compat.describe()

    def collect(self) -> Iterator[Metric]:
        fams = _Families.make(self.count_max_age)
        with self._lock:
            for name in PRESSURE_MAPS:
                self._map_fill(name, fams)
            self._verdicts(fams)
            self._ct_events(fams)
            compat = self._node_compat() if self.node_exporter_compat else []
        yield from fams.all()
        yield from compat

    def _open(self, name: str) -> Map | None:
        path = os.path.join(self.pin_root, name)
        if not os.path.exists(path):
            return None
        try:
            return Map.from_pin(path)
        except TupletError as e:
            log.warning("metrics: cannot open pinned map", map=name, error=str(e))
            return None

    def _map_fill(self, name: str, fams: _Families) -> None:
        m = self._open(name)
        if m is None:
            self._counts.pop(name, None)
            return
        with m:
            if not m.info.is_hash:
                return
            now = self.clock()
            cached = self._counts.get(name)
            if cached is None or cached.map_id != m.info.id or now - cached.at >= self.count_max_age:
                try:
                    cached = _Count(m.info.id, now, sentinels.count_live(m))
                except TupletError as e:
                    log.warning("metrics: cannot count map entries", map=name, error=str(e))
                    return
                self._counts[name] = cached
            cap = m.max_entries
        self._caps[name] = cap
        fams.entries.add_metric([name], cached.entries)
        fams.capacity.add_metric([name], cap)
        fams.pressure.add_metric([name], cached.entries / cap if cap else 0.0)

    def _names(self, m: Map, spec: enums.EnumSpec) -> dict[int, str]:
        """spec's names from the map's own BTF (the running datapath's), else from the object
        on disk; cached per BTF id."""
        key = (m.info.btf_id, spec)
        if key not in self._names_by_btf:
            self._names_by_btf[key] = enums.map_names(m, spec, self.obj_path or object_path(OBJ_LXC))
        return self._names_by_btf[key]

    def _verdicts(self, fams: _Families) -> None:
        m = self._open(METRICS_MAP)
        if m is None:
            fams.insert_failures.add_metric([], 0)
            return
        with m:
            reasons, directions = self._names(m, enums.REASONS), self._names(m, enums.DIRECTIONS)
            try:
                counters = metrics.read(m, reasons, directions)
            except TupletError as e:
                log.warning("metrics: cannot read verdict counters", error=str(e))
                return
        fwd: dict[str, list[int]] = {}
        failed = 0
        for c in counters:
            fams.verdicts.add_metric([c.reason, c.direction], c.packets)
            if c.dropped:
                fams.drops.add_metric([c.reason, c.direction], c.packets)
                fams.drop_bytes.add_metric([c.reason, c.direction], c.bytes)
                failed += c.packets if c.reason == INSERT_FAILED else 0
            else:
                acc = fwd.setdefault(c.direction, [0, 0])
                acc[0] += c.packets
                acc[1] += c.bytes
        for direction, (packets, bytes_) in sorted(fwd.items()):
            fams.forwards.add_metric([direction], packets)
            fams.forward_bytes.add_metric([direction], bytes_)
        fams.insert_failures.add_metric([], failed)

    def _node_compat(self) -> list[Metric]:
        """node_nf_conntrack_* from this scrape's counts and the per-CPU counters."""
        entries = {n: (c.entries, self._caps[n]) for n, c in self._counts.items()
                   if n in node_compat.TABLES and n in self._caps}
        mm, em = self._open(METRICS_MAP), self._open(abi.EVENTS_MAP)
        try:
            reasons = self._names(mm, enums.REASONS) if mm else {}
            evnames = self._names(em, enums.CT_EVENTS) if em else {}
            total = ctstats.collect(mm, reasons, em, evnames)[1] if mm or em else None
        except TupletError as e:
            log.warning("metrics: cannot read counters for node_nf_conntrack_stat_*", error=str(e))
            total = None
        finally:
            for m in (mm, em):
                if m is not None:
                    m.close()
        return list(node_compat.families(entries, total))

    def _ct_events(self, fams: _Families) -> None:
        m = self._open(abi.EVENTS_MAP)
        if m is None:   # a datapath from before the counters
            return
        with m:
            try:
                counts = ct_events.read(m, self._names(m, enums.CT_EVENTS))
            except TupletError as e:
                log.warning("metrics: cannot read conntrack event counters", error=str(e))
                return
        for name, n in counts.items():
            fams.ct_events.add_metric([name], n)
