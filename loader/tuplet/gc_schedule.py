"""When GC passes run: the reference's adaptive interval, a fixed one, a cap, early passes.

Adaptive (``--conntrack-gc-interval 0s``, the default): start at 5 minutes; after each
pass, with ``ratio = deleted / capacity`` of the maps the pass scanned:

- ratio > 0.25: the table churns, collect sooner: ``interval *= 1 - min(ratio, 0.9)``,
  never below 10 s;
- 0 < ratio < 0.05: little to collect, collect later: ``interval *= 1.5``, never above
  12 h;
- otherwise (ratio 0, or between 5% and 25%) the interval stays.

A fixed interval replaces the adaptive one. A maximum (``--conntrack-gc-max-interval``)
caps whichever applies. Early passes (the datapath reported a failed insert) are
allowed at most once per ``early_min_gap`` seconds, so a flood of signals cannot turn
GC into a busy loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

START = 300.0
FLOOR = 10.0
CAP = 12 * 3600.0
SHRINK_ABOVE = 0.25
GROW_BELOW = 0.05
GROW_FACTOR = 1.5
MAX_SHRINK = 0.9
EARLY_MIN_GAP = 10.0


def next_adaptive(interval: float, deleted: int, capacity: int) -> float:
    """The reference's rule for the interval after a pass."""
    ratio = deleted / capacity if capacity > 0 else 0.0
    if ratio > SHRINK_ABOVE:
        return max(interval * (1.0 - min(ratio, MAX_SHRINK)), FLOOR)
    if 0.0 < ratio < GROW_BELOW:
        return min(interval * GROW_FACTOR, CAP)
    return interval


@dataclass
class GcSchedule:
    fixed: float = 0.0          # seconds; 0 = adaptive
    maximum: float = 0.0        # seconds; 0 = no cap
    early_min_gap: float = EARLY_MIN_GAP
    _adaptive: float = field(default=START, init=False)
    _last_early: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for name in ("fixed", "maximum", "early_min_gap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def mode(self) -> str:
        return "fixed" if self.fixed else "adaptive"

    @property
    def interval(self) -> float:
        """The interval until the next pass, as things stand."""
        base = self.fixed if self.fixed else self._adaptive
        return min(base, self.maximum) if self.maximum else base

    def after_pass(self, deleted: int, capacity: int) -> float:
        """Feed a pass's result; returns the interval until the next one."""
        self._adaptive = next_adaptive(self._adaptive, deleted, capacity)
        return self.interval

    def next_due(self, last_pass: float) -> float:
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
