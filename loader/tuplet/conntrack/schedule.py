"""When GC passes run: the reference's adaptive interval, a fixed one, a cap, early passes.

Adaptive (``--conntrack-gc-interval 0s``, the default): start at 5 minutes; after each
pass, with ``ratio`` = the largest ``deleted / max_entries`` among the CT maps the pass
scanned (each table on its own, so a churning non-TCP table is not diluted by a large,
quiet TCP one):

- ratio > 0.25: the table churns, collect sooner: ``interval *= 1 - min(ratio, 0.9)``,
  never below 10 s;
- 0 < ratio < 0.05: little to collect, collect later: ``interval *= 1.5``, never above
  12 h;
- otherwise the interval stays. That includes ratio == 0 (nothing deleted): the
  reference's rule reads "0 < ratio < 0.05", so an idle table does not push the
  interval towards 12 h; only a pass that found a little garbage does.

The result is rounded to whole seconds, as the reference does.

A fixed interval replaces the adaptive one. A maximum (``--conntrack-gc-max-interval``)
caps whichever applies. Early passes (the datapath reported a failed insert) are
allowed at most once per ``early_min_gap`` seconds (default 10 s), so a flood of
signals cannot turn GC into a busy loop; they do not change the adaptive interval
other than by their own result, like any pass.

Pressure (:mod:`tuplet.conntrack.pressure`): when a pass leaves a main table (TCP or non-TCP
conntrack, NAT) at least 90% full, the next pass is due after ``FLOOR`` (10 s) instead,
or after the regular interval when that is shorter. 10 s is the adaptive schedule's own
shortest interval and the early-pass gap: pressure makes GC run as often as a churning
table or the datapath's fill-up signals already may, never more. A pass under pressure
that frees less than 1% (``PRESSURE_MIN_FREED``) of the tables under pressure doubles
that delay (20 s, 40 s, ... up to the regular interval): a table full of live entries
needs room (auto-grow or the operator), not more walks, and a walk of a 16M-entry table
costs a second or more. A pass that frees 1% or more brings the delay back to 10 s; a
pass with no table under pressure ends it. The TCP handshake table (``tpl_ct4_syn_v1``)
is not a main table: a SYN flood fills it by design and its LRU recycles it, so its
fill never shortens the interval (its deletions count in the delete ratio like any
table's, which the 10 s floor bounds).

Everything here is pure: times are passed in (``now``, ``last_pass``), nothing sleeps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from tuplet.core.durations import format_duration

START = 300.0
FLOOR = 10.0
CAP = 12 * 3600.0
SHRINK_ABOVE = 0.25
GROW_BELOW = 0.05
GROW_FACTOR = 1.5
MAX_SHRINK = 0.9
EARLY_MIN_GAP = 10.0
#: Under pressure the next pass is due after this many seconds (doubling while passes free little).
PRESSURE_DELAY = FLOOR
#: A pass under pressure that frees less than this share of the pressured tables backs off.
PRESSURE_MIN_FREED = 0.01


def delete_ratio(per_map: Iterable[tuple[int, int]]) -> float:
    """The ratio that drives the adaptive interval: the largest ``deleted / max_entries``
    over ``(deleted, max_entries)`` pairs, one per map scanned (0 for none, or maps of
    no capacity)."""
    return max((d / cap for d, cap in per_map if cap > 0), default=0.0)


def _round_seconds(x: float) -> float:
    """Nearest whole second, halves away from zero (Go's Duration.Round)."""
    return float(math.floor(x + 0.5))


def next_adaptive(interval: float, ratio: float) -> float:
    """The reference's rule for the interval after a pass whose delete ratio was ``ratio``."""
    if ratio > SHRINK_ABOVE:
        return max(_round_seconds(interval * (1.0 - min(ratio, MAX_SHRINK))), FLOOR)
    if 0.0 < ratio < GROW_BELOW:
        return min(_round_seconds(interval * GROW_FACTOR), CAP)
    return interval


@dataclass
class GcSchedule:
    """The interval between passes and the early-pass rate limit of one GC loop."""

    fixed: float = 0.0          # seconds; 0 = adaptive
    maximum: float = 0.0        # seconds; 0 = no cap
    early_min_gap: float = EARLY_MIN_GAP
    _adaptive: float = field(default=START, init=False)
    _last_early: float | None = field(default=None, init=False)
    _pressure_delay: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for name in ("fixed", "maximum", "early_min_gap"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value}")

    @property
    def mode(self) -> str:
        return "fixed" if self.fixed else "adaptive"

    @property
    def regular_interval(self) -> float:
        """The interval without pressure: fixed or adaptive, capped by the maximum."""
        base = self.fixed if self.fixed else self._adaptive
        return min(base, self.maximum) if self.maximum else base

    @property
    def interval(self) -> float:
        """The interval until the next pass, as things stand."""
        if self.pressured and self._pressure_delay is not None:
            return self._pressure_delay
        return self.regular_interval

    @property
    def pressured(self) -> bool:
        """Is the next pass early because a table is under pressure?"""
        return self._pressure_delay is not None and self._pressure_delay < self.regular_interval

    def after_pass(self, ratio: float, pressure_freed: float | None = None) -> float:
        """Feed a pass's delete ratio (:func:`delete_ratio`); returns the interval until
        the next pass. The adaptive interval is kept up to date in fixed mode too.

        ``pressure_freed``: None when the pass left no main table under pressure; else
        the largest share of capacity the pass freed in a table under pressure."""
        if not ratio >= 0.0:   # also refuses NaN; above 1 shrinks like 0.9
            raise ValueError(f"delete ratio must not be negative, got {ratio}")
        self._adaptive = next_adaptive(self._adaptive, ratio)
        if pressure_freed is None:
            self._pressure_delay = None
        elif self._pressure_delay is None or pressure_freed >= PRESSURE_MIN_FREED:
            self._pressure_delay = PRESSURE_DELAY
        else:
            self._pressure_delay = min(self._pressure_delay * 2, max(self.regular_interval, PRESSURE_DELAY))
        return self.interval

    def next_due(self, last_pass: float) -> float:
        """When the next pass is due, given when the last one (of any kind) ran."""
        return last_pass + self.interval

    def request_early(self, now: float) -> bool:
        """May an early pass run now? Records it when it may."""
        if self._last_early is not None and now - self._last_early < self.early_min_gap:
            return False
        self._last_early = now
        return True

    def describe(self) -> str:
        cap = f", max {self.maximum:g}s" if self.maximum else ""
        pressure = " (table pressure)" if self.pressured else ""
        return f"{self.mode}, next in {self.interval:g}s{pressure}{cap}"


def describe_settings(interval: float, maximum: float, early_min_gap: float = EARLY_MIN_GAP) -> str:
    """One line for status: how the GC interval is chosen, with Go-style durations."""
    if interval:
        mode = f"fixed {format_duration(interval)}"
    else:
        mode = (f"adaptive (starts at {format_duration(START)}, between {format_duration(FLOOR)} "
                f"and {format_duration(CAP)})")
    cap = f", max {format_duration(maximum)}" if maximum else ", no max"
    return f"interval {mode}{cap}; early passes on failed inserts, at most one per {format_duration(early_min_gap)}"
