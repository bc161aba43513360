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

Everything here is pure: times are passed in (``now``, ``last_pass``), nothing sleeps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from .durations import format_duration

START = 300.0
FLOOR = 10.0
CAP = 12 * 3600.0
SHRINK_ABOVE = 0.25
GROW_BELOW = 0.05
GROW_FACTOR = 1.5
MAX_SHRINK = 0.9
EARLY_MIN_GAP = 10.0


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

    def __post_init__(self) -> None:
        for name in ("fixed", "maximum", "early_min_gap"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value}")

    @property
    def mode(self) -> str:
        return "fixed" if self.fixed else "adaptive"

    @property
    def interval(self) -> float:
        """The interval until the next pass, as things stand."""
        base = self.fixed if self.fixed else self._adaptive
        return min(base, self.maximum) if self.maximum else base

    def after_pass(self, ratio: float) -> float:
        """Feed a pass's delete ratio (:func:`delete_ratio`); returns the interval until
        the next pass. The adaptive interval is kept up to date in fixed mode too."""
        if not ratio >= 0.0:   # also refuses NaN; above 1 shrinks like 0.9
            raise ValueError(f"delete ratio must not be negative, got {ratio}")
        self._adaptive = next_adaptive(self._adaptive, ratio)
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
        return f"{self.mode}, next in {self.interval:g}s{cap}"


def describe_settings(interval: float, maximum: float, early_min_gap: float = EARLY_MIN_GAP) -> str:
    """One line for status: how the GC interval is chosen, with Go-style durations."""
    if interval:
        mode = f"fixed {format_duration(interval)}"
    else:
        mode = (f"adaptive (starts at {format_duration(START)}, between {format_duration(FLOOR)} "
                f"and {format_duration(CAP)})")
    cap = f", max {format_duration(maximum)}" if maximum else ", no max"
    return f"interval {mode}{cap}; early passes on failed inserts, at most one per {format_duration(early_min_gap)}"
