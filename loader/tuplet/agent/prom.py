"""Prometheus metrics of the node agent, named and labelled like the reference's
(``cilium_X`` is ``tuplet_X``), so existing dashboards port by renaming.

* :class:`DatapathCollector` reads the pinned maps of one pin root at scrape time: how
  full each hash map is, and the datapath's verdict counters (``tpl_metrics_v2``).
  Maps are opened on every scrape, so a map replaced behind its pin (a live resize) is
  never reported stale. Counting a hash map's entries walks it (O(entries)), so counts
  are kept for ``count_max_age`` seconds (default 5) unless the pin's map id changes.
  Also the datapath's conntrack event counters (``tpl_ct_events_v1``: inserts per
  table, promotions out of the handshake table, refused inserts).
* :class:`GcMetrics` is fed by the GC runner (``on_pass``): runs, durations, entries
  alive/deleted per table, the current interval; and by the agent's pressure handling
  (:mod:`tuplet.pressure`): each table's fill after the last pass, estimated LRU
  evictions, tables auto-grown.
* :func:`serve` runs prometheus_client's HTTP server on a ``--prometheus-serve-addr``
  value (``:9962``, ``127.0.0.1:9962``, ``[::1]:9962``; empty disables it).

Everything registers with a caller-given :class:`CollectorRegistry`, never the global one.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric

from tuplet.bpf import _libbpf as C
from tuplet.bpf.maps import Map
from tuplet.conntrack.runner import PassReport
from tuplet.core.errors import ConfigError, TupletError
from tuplet.datapath import abi, metrics
from tuplet.datapath import events as ct_events
from tuplet.datapath.abi import (
    CT_MAP_ANY,
    CT_MAP_SYN,
    CT_MAP_TCP,
    CT_MAPS,
    EP_MAP,
    LB_MAPS,
    METRICS_MAP,
    NAT_MAP,
    OBJ_LXC,
)
from tuplet.datapath.paths import object_dir

log = structlog.get_logger("tuplet.prom")

FLAG = "--prometheus-serve-addr"
DEFAULT_COUNT_MAX_AGE = 5.0
#: Maps whose fill level is reported, when pinned. Only hash maps are (an array is always full).
PRESSURE_MAPS = (*CT_MAPS, NAT_MAP, EP_MAP, *LB_MAPS)
HASH_TYPES = {C.BPF_MAP_TYPE_HASH, C.BPF_MAP_TYPE_LRU_HASH, C.BPF_MAP_TYPE_PERCPU_HASH,
              C.BPF_MAP_TYPE_LRU_PERCPU_HASH, C.BPF_MAP_TYPE_HASH_OF_MAPS}
INSERT_FAILED = "DROP_CT_INSERT_FAILED"

FAMILY = "ipv4"
#: The reference's protocol label per CT table.
# The handshake table gets its own protocol value, so the TCP series keep meaning the reference's table.
PROTOCOLS = {CT_MAP_TCP: "TCP", CT_MAP_ANY: "non-TCP", CT_MAP_SYN: "TCP-handshake"}
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
                 obj_path: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.pin_root = pin_root
        self.count_max_age = count_max_age
        self.obj_path = obj_path
        self.clock = clock
        self._counts: dict[str, _Count] = {}
        self._lock = threading.Lock()
        self._names_by_btf: dict[int, tuple[dict[int, str], dict[int, str] | None]] = {}
        self._event_names: dict[int, dict[int, str]] = {}

    def describe(self) -> Iterator[Metric]:
        """The families without samples (lets the registry detect clashing names)."""
        yield from _Families.make(self.count_max_age).all()

    def collect(self) -> Iterator[Metric]:
        fams = _Families.make(self.count_max_age)
        with self._lock:
            for name in PRESSURE_MAPS:
                self._map_fill(name, fams)
            self._verdicts(fams)
            self._ct_events(fams)
        yield from fams.all()

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
            if m.info.type not in HASH_TYPES:
                return
            now = self.clock()
            cached = self._counts.get(name)
            if cached is None or cached.map_id != m.info.id or now - cached.at >= self.count_max_age:
                try:
                    cached = _Count(m.info.id, now, m.count())
                except TupletError as e:
                    log.warning("metrics: cannot count map entries", map=name, error=str(e))
                    return
                self._counts[name] = cached
            cap = m.max_entries
        fams.entries.add_metric([name], cached.entries)
        fams.capacity.add_metric([name], cap)
        fams.pressure.add_metric([name], cached.entries / cap if cap else 0.0)

    def _names(self, m: Map) -> tuple[dict[int, str], dict[int, str] | None]:
        """Reason and direction names from the counter map's own BTF (the running datapath's),
        else from the object file on disk."""
        btf_id = m.info.btf_id
        if btf_id not in self._names_by_btf:
            try:
                btf = m.btf()
                reasons = {v: k.removeprefix("TPL_") for k, v in btf.enum_values("tpl_reason").items()
                           if not k.endswith(("_BASE", "_SLOTS"))}
                dirs = {v: k.removeprefix("TPL_METRIC_").lower()
                        for k, v in btf.enum_values("tpl_metric_dir").items() if k != "TPL_METRIC_DIRS"}
                self._names_by_btf[btf_id] = (reasons, dirs)
            except (TupletError, KeyError, ValueError) as e:
                obj = self.obj_path or str(object_dir() / OBJ_LXC)
                log.warning("metrics: no reason names in the map's BTF, using the object's", object=obj,
                            error=str(e))
                try:
                    self._names_by_btf[btf_id] = (metrics.reason_names(obj), metrics.direction_names(obj))
                except (TupletError, OSError, ValueError) as e2:
                    log.warning("metrics: no reason names, using numbers", object=obj, error=str(e2))
                    self._names_by_btf[btf_id] = ({}, None)
        return self._names_by_btf[btf_id]

    def _verdicts(self, fams: _Families) -> None:
        m = self._open(METRICS_MAP)
        if m is None:
            fams.insert_failures.add_metric([], 0)
            return
        with m:
            reasons, directions = self._names(m)
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


    def _ct_events(self, fams: _Families) -> None:
        m = self._open(abi.EVENTS_MAP)
        if m is None:   # a datapath from before the counters
            return
        with m:
            btf_id = m.info.btf_id
            if btf_id not in self._event_names:
                try:
                    self._event_names[btf_id] = {v: k.removeprefix("CT_EV_").lower()
                                                 for k, v in m.btf().enum_values("ct_event").items()
                                                 if k != "CT_EV_MAX"}
                except (TupletError, KeyError, ValueError):
                    obj = self.obj_path or str(object_dir() / OBJ_LXC)
                    try:
                        self._event_names[btf_id] = ct_events.event_names(obj)
                    except (TupletError, OSError, ValueError, KeyError) as e:
                        log.warning("metrics: no conntrack event names", object=obj, error=str(e))
                        self._event_names[btf_id] = {}
            try:
                counts = ct_events.read(m, self._event_names[btf_id])
            except TupletError as e:
                log.warning("metrics: cannot read conntrack event counters", error=str(e))
                return
        for name, n in counts.items():
            fams.ct_events.add_metric([name], n)


# --- GC, fed by the runner ----------------------------------------------------------------------

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
        # Table pressure (tuplet.pressure).
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

    def observe(self, report: PassReport) -> None:
        """Record one completed pass."""
        for s in report.result.maps:
            proto = PROTOCOLS.get(s.map, s.map)
            self.runs.labels(FAMILY, proto, "completed").inc()
            self.duration.labels(FAMILY, proto, "completed").observe(s.duration)
            self.entries.labels(FAMILY, proto, "alive").set(s.alive)
            self.entries.labels(FAMILY, proto, "deleted").set(s.deleted)
            self.deleted.labels(FAMILY, proto).inc(s.deleted)
            self.nat_deleted.labels(FAMILY, proto).inc(s.nat_deleted)
        for name, f in report.fill.items():
            self.fill.labels(name).set(f)
        self.interval.set(report.interval)
        self.passes.labels(report.reason).inc()

    def evictions(self, per_map: dict[str, int]) -> None:
        for name, n in per_map.items():
            self.evicted.labels(name).inc(n)

    def failed(self, maps: tuple[str, ...] = CT_MAPS, duration: float = 0.0) -> None:
        """Record a pass that raised (status ``uncompleted``, as the reference)."""
        for name in maps:
            proto = PROTOCOLS.get(name, name)
            self.runs.labels(FAMILY, proto, "uncompleted").inc()
            self.duration.labels(FAMILY, proto, "uncompleted").observe(duration)


# --- the HTTP endpoint --------------------------------------------------------------------------

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse_addr(value: str) -> tuple[str, int] | None:
    """``[HOST]:PORT`` to (host, port); host "" means every address. "" disables: None."""
    if value == "":
        return None

    def bad(why: str) -> ConfigError:
        return ConfigError(FLAG, f"{value!r}: {why} (expected [HOST]:PORT, e.g. :9962, 127.0.0.1:9962, "
                                 "[::1]:9962; empty disables the endpoint)")

    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise bad("an IPv6 address in brackets must be followed by :PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise bad("no ':' before the port")
        if ":" in host:
            raise bad("an IPv6 address needs brackets")
        if host and not _HOSTNAME.match(host):
            raise bad(f"{host!r} is not an address or host name")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad(f"{host!r} is not an IPv4 address") from None
    if not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise bad(f"port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def _v6only() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "1"
    except OSError:
        return False


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class MetricsServer:
    """A running endpoint; ``port`` is the bound one (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return _join(self.host, self.port)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        log.info("metrics endpoint stopped", address=self.address)


def serve(addr: str, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on a ``--prometheus-serve-addr`` value; None when it is empty."""
    parsed = parse_addr(addr)
    if parsed is None:
        return None
    host, port = parsed
    # "Every address": IPv6's wildcard takes IPv4 too, unless the host has no IPv6 or
    # net.ipv6.bindv6only is set.
    binds = [host] if host else ["0.0.0.0"] if _v6only() else ["::", "0.0.0.0"]
    for i, bind in enumerate(binds):
        try:
            server, thread = start_http_server(port, bind, registry)
        except socket.gaierror as e:
            raise TupletError(f"metrics endpoint {_join(host, port)}", "listen",
                              detail=f"cannot resolve {host!r}: {e.strerror} (from {FLAG} {addr!r})") from e
        except OSError as e:
            if i + 1 < len(binds) and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise TupletError(f"metrics endpoint {_join(host, port)}", "listen", e.errno or 0,
                              f"from {FLAG} {addr!r}" if e.errno else f"{e} (from {FLAG} {addr!r})") from e
        thread.name = "tuplet-metrics"
        ms = MetricsServer(server, thread, host, server.server_address[1])
        log.debug("metrics endpoint listening", address=ms.address)
        return ms
    raise AssertionError("unreachable")
