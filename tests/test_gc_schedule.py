"""The GC interval arithmetic and the early-pass rate limit (no sleeping: explicit times)."""
from __future__ import annotations

import math

import pytest

from tuplet.conntrack.schedule import (
    CAP,
    EARLY_MIN_GAP,
    FLOOR,
    START,
    GcSchedule,
    delete_ratio,
    describe_settings,
    next_adaptive,
)


def test_starts_at_five_minutes() -> None:
    s = GcSchedule()
    assert s.interval == START == 300 and s.mode == "adaptive"
    assert s.next_due(1000.0) == 1300.0


@pytest.mark.parametrize("ratio,want", [
    (0.5, 150),                      # > 0.25: shrink by the ratio
    (0.250001, 225),                 # 224.9997 rounded to whole seconds
    (0.95, 30),                      # ratio capped at 0.9
    (1.0, 30),
    (0.25, 300),                     # exactly 0.25: unchanged
    (0.1, 300),                      # in the band: unchanged
    (0.05, 300),                     # exactly 0.05: unchanged
    (0.049999, 450),                 # below 0.05: grow 1.5x
    (1e-6, 450),
    (0.0, 300),                      # nothing deleted: "0 < ratio" fails, unchanged
])
def test_one_step(ratio: float, want: float) -> None:
    assert next_adaptive(300, ratio) == want


def test_whole_seconds_rounded_half_up() -> None:
    assert next_adaptive(675, 0.01) == 1013          # 1012.5
    assert next_adaptive(45, 0.5) == 23               # 22.5


def test_ratio_is_the_largest_per_map() -> None:
    # The non-TCP table churns (half of it deleted), the big TCP table is quiet: shrink.
    # (Deleted over the two capacities together would be 0.17: no change.)
    per_map = [(1_000, 524_288), (131_072, 262_144)]
    assert delete_ratio(per_map) == 0.5
    assert next_adaptive(300, delete_ratio(per_map)) == 150
    assert delete_ratio([]) == 0.0
    assert delete_ratio([(5, 0)]) == 0.0              # a map of no capacity counts as nothing


def test_floor_and_cap() -> None:
    s = GcSchedule()
    assert [s.after_pass(0.9) for _ in range(3)] == [30, FLOOR, FLOOR]
    for _ in range(100):
        s.after_pass(0.001)
    assert s.interval == CAP == 43200
    assert s.after_pass(0.001) == CAP
    assert next_adaptive(FLOOR, 0.0) == FLOOR


def test_zero_deleted_never_moves_the_interval() -> None:
    s = GcSchedule()
    s.after_pass(0.5)
    for _ in range(50):
        assert s.after_pass(0.0) == 150


def test_fixed_interval_overrides_and_max_caps() -> None:
    s = GcSchedule(fixed=60)
    assert s.after_pass(0.9) == 60 and s.mode == "fixed"
    assert s.after_pass(0.001) == 60
    assert s.next_due(1000.0) == 1060.0
    assert GcSchedule(fixed=600, maximum=120).interval == 120     # max caps a fixed interval
    assert GcSchedule(fixed=60, maximum=120).interval == 60
    s = GcSchedule(maximum=400)
    assert [s.after_pass(0.001) for _ in range(3)] == [400, 400, 400]   # 450, 675, 1013: capped
    assert s.next_due(1000.0) == 1400.0
    # The adaptive value underneath keeps moving: it shrinks from 1013, not from the cap.
    assert s.after_pass(0.5) == 400       # 1013 * 0.5 = 506.5 -> 507, still capped
    assert s.after_pass(0.5) == 254


def test_early_passes_are_rate_limited() -> None:
    s = GcSchedule(early_min_gap=10)
    assert s.request_early(100.0)
    assert not s.request_early(105.0)
    assert not s.request_early(109.99)
    assert s.request_early(110.0)
    assert not s.request_early(119.0)     # the gap counts from the last allowed one
    assert s.request_early(500.0)


def test_early_gap_default_and_zero() -> None:
    s = GcSchedule()
    assert s.early_min_gap == EARLY_MIN_GAP == 10
    assert s.request_early(0.0) and not s.request_early(9.0) and s.request_early(10.0)
    unlimited = GcSchedule(early_min_gap=0)
    assert all(unlimited.request_early(1.0) for _ in range(3))


def test_refused_values() -> None:
    for kw in ({"fixed": -1}, {"maximum": -0.5}, {"early_min_gap": -1}, {"fixed": math.nan},
               {"maximum": math.inf}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            GcSchedule(**kw)
    with pytest.raises(ValueError, match="ratio"):
        GcSchedule().after_pass(-0.1)
    with pytest.raises(ValueError, match="ratio"):
        GcSchedule().after_pass(math.nan)


def test_describe_settings() -> None:
    assert describe_settings(0, 0) == ("interval adaptive (starts at 5m0s, between 10s and 12h0m0s), no max; "
                                       "early passes on failed inserts, at most one per 10s")
    assert describe_settings(3600, 1800).startswith("interval fixed 1h0m0s, max 30m0s;")
