"""The datapath's clock: conntrack lifetimes are whole seconds of CLOCK_MONOTONIC."""
from __future__ import annotations

import time


def monotonic_now() -> int:
    """Now on the datapath's clock (bpf_ktime_get_coarse_ns() / 1e9, as bpf/lib/time.h reads it)."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC))
