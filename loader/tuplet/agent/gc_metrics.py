"""The reference's conntrack GC metrics, fed by the GC runner (``on_pass``) and by the
agent's pressure handling (:mod:`tuplet.conntrack.pressure`): runs, durations, entries
alive/deleted per table, the current interval, each table's fill after the last pass,
estimated LRU evictions, tables auto-grown."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tuplet.conntrack.pressure import MAIN_TABLES
from tuplet.conntrack.runner import PassReport
from tuplet.datapath import cttables

#: The reference's family and protocol labels per CT table (cttables.CtTable.label: the
#: handshake tables get their own protocol value, so the TCP series keep meaning the
#: reference's tables).
LABELS = {t.name: (t.family.value, t.label) for t in cttables.CT_TABLES}
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GcMetrics:
    """The reference's conntrack GC metrics; pass :meth:`observe` as the runner's ``on_pass``."""

    LABELS = ("family", "protocol", "status")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter("tuplet_datapath_conntrack_gc_runs", "Conntrack GC runs per table",
                            self.LABELS, registry=registry)
        self.duration = Histogram("tuplet_datapath_conntrack_gc_duration_seconds",
                                  "Duration of one conntrack GC run over one table", self.LABELS,
                                  buckets=GC_BUCKETS, registry=registry)
        self.entries = Gauge("tuplet_datapath_conntrack_gc_entries",
                             "Entries of a conntrack table alive after / deleted by the last GC run "
                             "(alive + deleted = entries before it)", self.LABELS, registry=registry)
        self.interval = Gauge("tuplet_datapath_conntrack_gc_interval_seconds",
                              "Interval until the next scheduled conntrack GC pass", registry=registry)
        self.deleted = Counter("tuplet_datapath_conntrack_gc_deleted", "Conntrack entries deleted by GC",
                               ("family", "protocol"), registry=registry)
        self.nat_deleted = Counter("tuplet_datapath_conntrack_gc_nat_deleted",
                                   "NAT entries deleted by GC with the conntrack entries owning them",
                                   ("family", "protocol"), registry=registry)
        self.passes = Counter("tuplet_datapath_conntrack_gc_passes",
                              "GC passes by what started them (start, interval, early: a fill-up signal, "
                              "pressure: a table at least 90% full after the previous pass)",
                              ("reason",), registry=registry)
        # Table pressure (tuplet.conntrack.pressure).
        self.fill = Gauge("tuplet_datapath_conntrack_gc_table_fill_ratio",
                          "Entries alive after the last GC pass / max_entries, per table (expired entries "
                          "collected, unlike tuplet_bpf_map_pressure); what early GC and auto-grow decide on",
                          ("map_name",), registry=registry)
        self.evicted = Counter("tuplet_datapath_conntrack_evictions_estimated",
                               "Entries the LRU conntrack tables evicted, estimated at each GC pass from the "
                               "datapath's insert counters and the pass's counts", ("map_name",),
                               registry=registry)
        self.grown = Counter("tuplet_conntrack_auto_grow", "Tables the agent grew because they stayed full "
                             "([conntrack] auto_grow)", ("map_name",), registry=registry)
        for name in MAIN_TABLES:   # at 0 from the start: increase() then counts the first grow
            self.grown.labels(name)

    def observe(self, report: PassReport) -> None:
        """Record one completed pass."""
        for s in report.result.maps:
            family, proto = LABELS[s.map]
            self.runs.labels(family, proto, "completed").inc()
            self.duration.labels(family, proto, "completed").observe(s.duration)
            self.entries.labels(family, proto, "alive").set(s.alive)
            self.entries.labels(family, proto, "deleted").set(s.deleted)
            self.deleted.labels(family, proto).inc(s.deleted)
            self.nat_deleted.labels(family, proto).inc(s.nat_deleted)
        for name, f in report.fill.items():
            self.fill.labels(name).set(f)
        self.interval.set(report.interval)
        self.passes.labels(report.reason).inc()

    def evictions(self, per_map: dict[str, int]) -> None:
        for name, n in per_map.items():
            self.evicted.labels(name).inc(n)

    def failed(self, maps: tuple[str, ...] = cttables.NAMES, duration: float = 0.0) -> None:
        """Record a pass that raised (status ``uncompleted``, as the reference)."""
        for name in maps:
            family, proto = LABELS[name]
            self.runs.labels(family, proto, "uncompleted").inc()
            self.duration.labels(family, proto, "uncompleted").observe(duration)
