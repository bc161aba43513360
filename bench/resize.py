#!/usr/bin/env python3
"""How long a live resize of the TCP conntrack table takes, by live entry count.

    make bench-resize      (or: .venv/bin/python bench/resize.py [--entries 100000,1000000])

For each case, a datapath without devices is applied on its own pin root (below
/sys/fs/bpf/tuplet/bench/, removed afterwards), ``tpl_ct4_v1`` is filled with N entries
of distinct keys and spread lifetimes (batch updates), then timed side by side in the same
run:

  reload   ``apply`` of the unchanged configuration (maps reused: the floor of any apply)
  resize   ``apply`` with another ``tcp_max``: new map, copy, program swap, late copy,
           pin replaced (what ``tuplet apply`` and ``systemctl reload tuplet`` do)

Cases: grow 2x, shrink 2x with room for every entry, and shrink below the live count (the
most recent entries are kept; the rest are reported dropped). The copy counts are checked
against the live count, so a resize that lost entries fails the run (exit 1).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))

from tuplet.agent import log  # noqa: E402
from tuplet.bpf.maps import Map  # noqa: E402
from tuplet.datapath import abi
from tuplet.datapath.layouts import CtEntry  # noqa: E402
from tuplet.node import apply as node_apply
from tuplet.node import config  # noqa: E402

BENCH_DIR = "/sys/fs/bpf/tuplet/bench"


def node_config(pin_root: str, tcp_max: int) -> config.NodeConfig:
    return config.parse(f'[node]\nname = "bench-resize"\npin_root = "{pin_root}"\n'
                        "[lb]\nsocket_lb = false\n"
                        f"[conntrack]\ntcp_max = {tcp_max}\nany_max = 1024\nnat_max = 1024\n")


def fill(m: Map, n: int) -> None:
    """n TCP entries with distinct keys and lifetimes spread over 100000 s, in batches."""
    idx = np.arange(n, dtype=np.uint32)
    keys = np.zeros((n, m.key_size), np.uint8)
    keys[:, 0:4] = idx.view(np.uint8).reshape(n, 4)          # daddr = i
    keys[:, 12] = 6                                          # nexthdr TCP
    vals = np.zeros((n, m.value_size), np.uint8)
    off = CtEntry.lifetime.offset
    vals[:, off:off + 4] = (idx % 100_000).view(np.uint8).reshape(n, 4)
    for i in range(0, n, 65536):
        c = min(65536, n - i)
        m.update_batch(keys[i:i + c].tobytes(), vals[i:i + c].tobytes(), c)


def one_case(n: int, old: int, new: int) -> tuple[str, bool]:
    pin_root = f"{BENCH_DIR}/resize-{os.getpid()}"
    try:
        node_apply.apply(node_config(pin_root, old))
        with Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}") as m:
            fill(m, n)
            live = m.count()
        t = time.perf_counter()
        node_apply.apply(node_config(pin_root, old))
        reload = time.perf_counter() - t
        t = time.perf_counter()
        res = node_apply.apply(node_config(pin_root, new))
        total = time.perf_counter() - t
        r = next(x for x in res.resized if x.map == abi.CT_MAP_TCP)
        with Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}") as m:
            after = m.count()
        # Everything fits: every entry is copied. It does not: the LRU map may hold a little
        # less than max_entries (per-CPU free lists), so at least 95% of it, the rest dropped.
        fits = live <= new
        ok = (r.copied == live if fits else r.copied >= 0.95 * new) and r.copied + r.dropped == live \
            and after >= r.copied
        line = (f"{live:>9,} {old:>9,} -> {new:>9,}  {r.copied:>9,} {r.dropped:>9,}  {r.duration_s:7.3f} s "
                f"{total:7.3f} s {reload:7.3f} s  {total / reload if reload else float('nan'):6.1f}x"
                + ("" if ok else f"  FAILED: {after:,} in the new map"))
        return line, ok
    finally:
        node_apply.teardown(pin_root)
        with contextlib.suppress(OSError):
            os.rmdir(BENCH_DIR)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", default="100000,1000000",
                    help="comma-separated live entry counts (default 100000,1000000)")
    args = ap.parse_args()
    try:
        counts = [int(x) for x in args.entries.split(",")]
    except ValueError:
        ap.error(f"--entries: not a list of integers: {args.entries!r}")
    if any(c < 1 or c > 1 << 24 for c in counts):
        ap.error("--entries: each count must be 1..16777216")
    if os.geteuid() != 0:
        print("bench/resize.py loads BPF programs and pins maps: run it as root", file=sys.stderr)
        return 2
    log.configure("warning")
    print(f"{'live':>9} {'tcp_max':>9}    {'new':>9}  {'copied':>9} {'dropped':>9}  {'copy+pin':>9} "
          f"{'resize':>9} {'reload':>9}  {'ratio':>6}")
    ok = True
    for n in counts:
        size = 1 << max(n - 1, 1).bit_length()          # the next power of two holding n
        for old, new in ((size, 2 * size), (2 * size, size), (size, size // 2)):
            line, good = one_case(n, old, new)
            print(line, flush=True)
            ok &= good
    print("copy+pin: the resize's own work (first copy, late copy, pin swap); resize: the whole apply; "
          "reload: apply with nothing to resize")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
