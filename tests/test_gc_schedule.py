"""The GC interval arithmetic and the early-pass rate limit (no sleeping: explicit times)."""
from __future__ import annotations

import pytest

from tuplet.gc_schedule import CAP, FLOOR, START, GcSchedule, next_adaptive

CAPACITY = 1_000_000


def test_starts_at_five_minutes() -> None:
    assert GcSchedule().interval == START == 300


@pytest.mark.parametrize("deleted,want", [
    (500_000, 300 * 0.5),            # ratio 0.5 > 0.25: shrink by the ratio
    (250_001, 300 * (1 - 0.250001)),
    (950_000, 300 * 0.1),            # ratio capped at 0.9
    (1_000_000, 300 * 0.1),
    (250_000, 300),                  # exactly 0.25: unchanged
    (100_000, 300),                  # 0.1: in the band, unchanged
    (50_000, 300),                   # exactly 0.05: unchanged
    (49_999, 450),                   # below 0.05: grow 1.5x
    (1, 450),
    (0, 300),                        # nothing deleted: 0 < ratio fails, unchanged
])
def test_one_step(deleted: int, want: float) -> None:
    assert next_adaptive(300, deleted, CAPACITY) == pytest.approx(want)


def test_floor_and_cap() -> None:
    s = GcSchedule()
    for _ in range(20):
        s.after_pass(900_000, CAPACITY)
    assert s.interval == FLOOR == 10
    for _ in range(100):
        s.after_pass(1, CAPACITY)
    assert s.interval == CAP == 43200
    assert next_adaptive(5, 0, 0) == 5     # empty capacity: ratio 0


def test_fixed_interval_overrides_and_max_caps() -> None:
    s = GcSchedule(fixed=60)
    assert s.after_pass(900_000, CAPACITY) == 60 and s.mode == "fixed"
    assert GcSchedule(fixed=600, maximum=120).interval == 120
    s = GcSchedule(maximum=400)
    for _ in range(3):
        s.after_pass(1, CAPACITY)       # 450, 675, 1012: capped
    assert s.interval == 400
    assert s.next_due(1000.0) == 1400.0


def test_early_passes_are_rate_limited() -> None:
    s = GcSchedule(early_min_gap=10)
    assert s.request_early(100.0)
    assert not s.request_early(105.0)
    assert not s.request_early(109.99)
    assert s.request_early(110.0)


def test_negative_values_are_refused() -> None:
    with pytest.raises(ValueError, match="fixed"):
        GcSchedule(fixed=-1)
