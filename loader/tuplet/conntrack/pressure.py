"""Table pressure: how full the conntrack and NAT tables are, and what the agent does about it.

Fill
    After every GC pass: entries alive / max_entries per table (``GcResult.fill``). The
    pass has just removed the expired entries, so this is what the table really holds,
    unlike a scrape-time count (``tuplet_bpf_map_pressure``), which includes garbage
    not collected yet. The NAT tables are counted too (GC does not walk them otherwise).

Main tables and the handshake table
    The main tables are ``tpl_ct4_v1``, ``tpl_ct_any4_v1``, ``tpl_nat4_v1`` and their
    IPv6 twins (``tpl_ct6_v1``, ``tpl_ct_any6_v1``, ``tpl_nat6_v1``): a full one evicts
    live connections. ``tpl_ct4_syn_v1`` holds TCP entries until their
    handshake completes; a SYN flood fills it by design (it is the sacrificial table,
    its LRU recycles it) so its fill is reported but drives nothing: no early passes,
    no growth.

Early GC (:mod:`tuplet.conntrack.schedule`)
    A main table at least ``PRESSURE_FILL`` (90%) full after a pass brings the next
    pass forward to 10 s, backing off while passes free little.

Auto-grow (``[conntrack] auto_grow``, off by default)
    A main table at least ``GROW_FILL`` (90%) full after ``GROW_STREAK`` (3) passes in a
    row, or at least ``GROW_NOW_FILL`` (95%) after one, is grown x``GROW_FACTOR`` (2),
    capped at ``auto_grow_max`` and the sizing maximum (2**24), through ``apply`` with
    that table's size overridden (a live resize: entries copied, programs swapped
    atomically). At the ceiling it is logged once that the table cannot grow further.
    A failed grow is logged, the datapath keeps running on the old table, and the table
    is not tried again for ``RETRY_AFTER`` seconds. Three passes at 90%: with the 10 s
    pressure schedule that is about half a minute of sustained fill, which a burst
    does not reach; 95% once: the LRU is about to evict (an LRU hash evicts before it
    is strictly full, per-CPU free lists), waiting would lose connections.

Grown sizes stay
    While auto_grow is on, a table is never made smaller than its pinned size by the
    configuration (a SIGHUP reload, an agent restart with the file's smaller size):
    the agent applies max(configured, pinned) per main table and logs each table so
    kept. Turn auto_grow off to shrink a table.

Evictions (an estimate)
    The datapath counts the entries it inserts per table and the promotions out of the
    handshake table (:mod:`tuplet.datapath.events`); LRU evictions happen inside the kernel
    and are counted nowhere. Between two passes of one GC loop, per table::

        evicted = alive_before + inserted - promoted_out - (alive_after + deleted_by_gc)

    Summed from the first pass of the loop this telescopes, so errors do not
    accumulate: entries inserted while a pass walks may be counted late (an
    underestimate until the next pass). Anything else that removes entries (``tuplet
    ct flush``) counts as evicted.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import structlog

from tuplet.bpf.maps import Map
from tuplet.conntrack.gc import GcResult
from tuplet.conntrack.sizing import LIMIT_MAX
from tuplet.datapath import cttables
from tuplet.datapath.cttables import Family, Proto

log = structlog.get_logger("tuplet.pressure")

#: Tables whose fill drives early GC and auto-grow: both families' TCP, non-TCP and NAT tables.
MAIN_TABLES = (*cttables.names(protos=(Proto.TCP, Proto.ANY)), *cttables.NAT_NAMES)
#: Reported only: full under a SYN flood by design.
HANDSHAKE_TABLES = cttables.names(protos=(Proto.SYN,))

PRESSURE_FILL = 0.90
GROW_FILL = 0.90
GROW_STREAK = 3
GROW_NOW_FILL = 0.95
GROW_FACTOR = 2
RETRY_AFTER = 300.0


def under_pressure(fill: Mapping[str, float]) -> list[str]:
    """The main tables at least PRESSURE_FILL full."""
    return [t for t in MAIN_TABLES if fill.get(t, 0.0) >= PRESSURE_FILL]


def freed(result: GcResult, tables: Iterable[str]) -> float:
    """The largest share of capacity a pass freed in one of ``tables``."""
    caps = capacities(result)
    deleted = {s.map: s.deleted for s in result.maps}
    deleted.update((c.map, result.nat_deleted_in(c.map)) for c in result.nat_counts)
    return max((deleted[t] / caps[t] for t in tables if t in deleted and caps.get(t)), default=0.0)


def capacities(result: GcResult) -> dict[str, int]:
    """max_entries per table of a pass's result (the NAT tables when counted)."""
    out = {s.map: s.max_entries for s in result.maps}
    out.update((c.map, c.max_entries) for c in result.nat_counts)
    return out


# --- auto-grow --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grow:
    """One table to grow, as decided after a pass."""

    map: str
    old_entries: int
    new_entries: int
    fill: float
    trigger: str       # why: ">=95% after one pass" or ">=90% after 3 passes"


@dataclass
class _TableState:
    capacity: int = 0
    streak: int = 0
    at_ceiling_logged: bool = False
    retry_at: float = 0.0
    pending: bool = False


@dataclass
class AutoGrow:
    """The auto-grow decisions of one agent (pure but for the log lines and the clock)."""

    enabled: bool = False
    ceiling: int = LIMIT_MAX
    clock: Callable[[], float] = time.monotonic
    tables: dict[str, _TableState] = field(default_factory=dict)

    def configure(self, enabled: bool, ceiling: int) -> None:
        ceiling = min(ceiling, LIMIT_MAX)
        if ceiling != self.ceiling:
            for st in self.tables.values():
                st.at_ceiling_logged = False
        self.enabled, self.ceiling = enabled, ceiling

    def observe(self, fill: Mapping[str, float], caps: Mapping[str, int]) -> list[Grow]:
        """Feed one pass's fill and capacities; returns the tables to grow now."""
        out = []
        now = self.clock()
        for t in MAIN_TABLES:
            if t not in fill or not caps.get(t):
                continue
            st = self.tables.setdefault(t, _TableState())
            cap, f = caps[t], fill[t]
            if cap != st.capacity:        # resized (grown, or by the configuration): start over
                self.tables[t] = st = _TableState(capacity=cap)
            st.streak = st.streak + 1 if f >= GROW_FILL else 0
            if not self.enabled or st.pending or now < st.retry_at:
                continue
            if f >= GROW_NOW_FILL:
                trigger = f">={GROW_NOW_FILL:.0%} after one pass"
            elif st.streak >= GROW_STREAK:
                trigger = f">={GROW_FILL:.0%} after {st.streak} passes in a row"
            else:
                continue
            target = min(cap * GROW_FACTOR, self.ceiling)
            if target <= cap:
                if not st.at_ceiling_logged:
                    st.at_ceiling_logged = True
                    log.warning("table cannot grow further", map=t, entries=cap, fill=round(f, 4),
                                ceiling=self.ceiling, hint="raise conntrack.auto_grow_max (at most "
                                f"{LIMIT_MAX}) or look at what fills the table")
                continue
            st.pending = True
            out.append(Grow(t, cap, target, f, trigger))
        return out

    def finished(self, table: str, ok: bool) -> None:
        """A decided grow is done (``ok``) or failed / was dropped (retry after RETRY_AFTER)."""
        st = self.tables.setdefault(table, _TableState())
        st.pending = False
        st.streak = 0
        if not ok:
            st.retry_at = self.clock() + RETRY_AFTER

    def dropped(self, table: str) -> None:
        """A decided grow became moot (the table changed size meanwhile): decide again."""
        st = self.tables.setdefault(table, _TableState())
        st.pending = False
        st.streak = 0


# --- sizes ------------------------------------------------------------------------------------

def pinned_sizes(pin_root: str) -> dict[str, int]:
    """max_entries of the main tables pinned under pin_root."""
    out = {}
    for t in MAIN_TABLES:
        path = os.path.join(pin_root, t)
        if os.path.exists(path):
            with Map.from_pin(path) as m:
                out[t] = m.max_entries
    return out


# --- evictions --------------------------------------------------------------------------------

#: Per CT table: the event counting entries in, the events counting entries the datapath moved out.
#: (bpf/lib/ct_events.h: an IPv6 table's events are its IPv4 twin's, suffixed 6.)
_EVENTS = {Proto.TCP: ("insert_tcp", ()), Proto.ANY: ("insert_any", ()), Proto.SYN: ("insert_syn", ("promoted",))}
_SUFFIX = {Family.IPV4: "", Family.IPV6: "6"}
TABLE_EVENTS = {t.name: (_EVENTS[t.proto][0] + _SUFFIX[t.family], tuple(o + _SUFFIX[t.family]
                                                                         for o in _EVENTS[t.proto][1]))
                for t in cttables.CT_TABLES}


@dataclass
class EvictionEstimate:
    """Entries the LRU tables evicted, estimated from the datapath's counters and GC passes."""

    _base: dict[str, int] = field(default_factory=dict)      # q at the loop's first pass
    _deleted: dict[str, int] = field(default_factory=dict)   # GC deletes since then
    _reported: dict[str, int] = field(default_factory=dict)

    def restart(self) -> None:
        """New maps (a new GC loop after an apply): count from the next pass."""
        self._base.clear()
        self._deleted.clear()
        self._reported.clear()

    def observe(self, result: GcResult, before: Mapping[str, int] | None,
                after: Mapping[str, int] | None) -> dict[str, int]:
        """Feed a pass's result with the event counters read just before and just after
        it; returns the entries evicted per table since the last call (never negative)."""
        if before is None or after is None:
            return {}
        out = {}
        first = not self._base
        for s in result.maps:
            names = TABLE_EVENTS.get(s.map)
            if names is None or names[0] not in before:
                continue
            ins, outs = names
            if first:
                # Entries inserted while this pass walked are either in alive or were
                # missed on both sides: take the counters after it.
                self._base[s.map] = after[ins] - sum(after[o] for o in outs) - s.alive
                self._deleted[s.map] = 0
                self._reported[s.map] = 0
                continue
            if s.map not in self._base:
                continue
            self._deleted[s.map] += s.deleted
            q = before[ins] - sum(before[o] for o in outs) - s.alive - self._deleted[s.map]
            total = max(q - self._base[s.map], 0)
            new = total - self._reported[s.map]
            if new > 0:
                self._reported[s.map] = total
                out[s.map] = new
        return out
