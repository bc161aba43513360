"""The datapath's clock: conntrack lifetimes are whole seconds of CLOCK_MONOTONIC, in a u32.

Lifetimes and "last seen" stamps are u32 seconds, so they wrap: compare them as the
signed difference of two u32 values (:func:`diff`), never with ``<`` on the raw
values, and never compute "now - N" as if the clock were larger than N (a node can
be seconds old).

Tests shift the datapath's clock with a test-only offset: ``clock_offset_sec`` in
the objects' ``.bss`` (``bpf/lib/time.h``). When ``TUPLET_TEST_CLOCK_OFFSET`` is set
(the test suite sets it for its near-zero clock run), every object tuplet loads
starts with that offset and :func:`monotonic_now` adds it too, so the programs, the
GC and ``ct list`` agree on a clock that reads near zero (or near the u32 wrap).
Unset in production: the offset is zero.
"""
from __future__ import annotations

import os
import time

from tuplet.bpf.objects import ObjectSpec
from tuplet.core.errors import ConfigError

#: The environment variable holding the test clock offset (seconds, taken modulo 2^32).
TEST_OFFSET_ENV = "TUPLET_TEST_CLOCK_OFFSET"
#: The .bss variable of bpf/lib/time.h added to the programs' clock.
OFFSET_VAR = "clock_offset_sec"
U32 = 1 << 32


def test_offset() -> int:
    """The test clock offset in force (0 in production)."""
    raw = os.environ.get(TEST_OFFSET_ENV, "")
    if not raw:
        return 0
    try:
        return int(raw) % U32
    except ValueError:
        raise ConfigError(TEST_OFFSET_ENV, f"must be an integer number of seconds, got {raw!r}") from None


def offset_for(start: int) -> int:
    """The offset that makes the datapath's clock read ``start`` now."""
    return (start - int(time.clock_gettime(time.CLOCK_MONOTONIC))) % U32


def monotonic_now() -> int:
    """Now on the datapath's clock (bpf_ktime_get_coarse_ns() / 1e9 + offset, as bpf/lib/time.h reads it)."""
    return (int(time.clock_gettime(time.CLOCK_MONOTONIC)) + test_offset()) % U32


def diff(a: int, b: int) -> int:
    """``a - b`` for two u32 clock values, across a wrap (the signed 32-bit difference)."""
    d = (a - b) % U32
    return d - U32 if d >= U32 // 2 else d


def apply_test_offset(spec: ObjectSpec) -> None:
    """Start an object's clock with the test offset, when one is set and the object has a clock."""
    off = test_offset()
    if off and spec.has_global(".bss", OFFSET_VAR):
        spec.set_initial(".bss", OFFSET_VAR, off)
