#!/usr/bin/env python3
"""GC over a nearly empty large table: how long does one system call hold the CPU?

    .venv/bin/python bench/gc_sparse.py [--sizes 4194304,8388608,16777216] [--live 0,1000]

A hash map has a bucket per entry of capacity (rounded up to a power of two), and the
kernel's BPF_MAP_LOOKUP_BATCH walks empty buckets without returning: its ``count``
bounds the entries copied, not the buckets visited. So on a nearly empty table one
batch call of GC's 2048 entries walks long runs of empty buckets at once. For each size
and number of live entries (10% of them expired) this prints the longest single call
of: BPF_MAP_LOOKUP_BATCH (GC's chunk of 2048, and 256), BPF_MAP_GET_NEXT_KEY, a whole GC
pass (batch method; its worst call is the lookup's), ``ct flush`` (Map.clear), and the
one-run in-kernel walk (bench/gc.py's floor). The kernel here does not preempt a system
call, so a call's wall time is the time it held its CPU (interrupts aside).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))
sys.path.insert(0, str(ROOT / "bench"))

from tuplet.agent import log  # noqa: E402
from tuplet.bpf import _libbpf as C  # noqa: E402
from tuplet.bpf.maps import Map  # noqa: E402
from tuplet.conntrack.gc import CtGc, Method  # noqa: E402
from tuplet.datapath.abi import CT_MAP_TCP, OBJ_LXC  # noqa: E402
from tuplet.datapath.clock import monotonic_now  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.config import NodeConfig  # noqa: E402


def bench_gc() -> Any:
    """bench/gc.py as a module (its name clashes with the standard library's gc)."""
    spec = importlib.util.spec_from_file_location("bench_gc", ROOT / "bench" / "gc.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("bench/gc.py not found")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Worst:
    """Times every BPF_MAP_LOOKUP_BATCH and BPF_MAP_DELETE_BATCH of one map (instance wrappers)."""

    def __init__(self, m: Map) -> None:
        self.worst = 0.0
        for name in ("lookup_batch", "delete_batch"):
            setattr(m, name, self._timed(getattr(m, name)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.worst = max(self.worst, time.perf_counter() - t)
        return call

    def during(self, fn: Callable[[], object]) -> float:
        self.worst = 0.0
        fn()
        return self.worst


def batch_calls(m: Map, chunk: int) -> float:
    """The longest BPF_MAP_LOOKUP_BATCH call of a whole read, in seconds."""
    buf, tok, worst = m.batch_buffers(chunk), None, 0.0
    while True:
        t = time.perf_counter()
        _, tok = m.lookup_batch(buf, tok)
        worst = max(worst, time.perf_counter() - t)
        if tok is None:
            return worst


def next_key_calls(m: Map) -> float:
    cur, nxt, worst = None, ctypes.create_string_buffer(m.key_size), 0.0
    while True:
        t = time.perf_counter()
        r = C.bpf_map_get_next_key(m.fd, cur, nxt)
        worst = max(worst, time.perf_counter() - t)
        if r != 0:
            return worst
        cur = ctypes.create_string_buffer(nxt.raw, m.key_size)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4194304,8388608,16777216")
    ap.add_argument("--live", default="0,1000")
    args = ap.parse_args()
    log.configure("warning")
    fill = bench_gc().fill
    print(f"{'capacity':>11} {'live':>6}  longest call, ms: {'batch 2048':>10} {'batch 256':>9} {'next_key':>8} "
          f"{'GC pass':>8} {'flush':>7} {'walk (1 run)':>12}")
    for n in (int(x) for x in args.sizes.split(",")):
        spec = open_object(OBJ_LXC, NodeConfig(), pin_root=None)
        spec.set_max_entries(CT_MAP_TCP, n)
        coll = spec.load()
        m = coll.maps[CT_MAP_TCP]
        calls = Worst(m)
        with CtGc([m], method=Method.BATCH) as g:
            for live in (int(x) for x in args.live.split(",")):
                now = monotonic_now()
                m.clear()
                if live:
                    fill(m, live, 0.1, now)
                b2048, b256, nk = batch_calls(m, 2048), batch_calls(m, 256), next_key_calls(m)
                walk = timed(lambda: g.walk_only(m))
                gc_pass = calls.during(lambda: g.run(now))   # its longest lookup (the deleter runs are short)
                flush = calls.during(m.clear)                # ct flush: lookups and deletes of 2048
                print(f"{n:>11,} {live:>6}  {'':17} {b2048 * 1e3:>10.1f} {b256 * 1e3:>9.1f} {nk * 1e3:>8.1f} "
                      f"{gc_pass * 1e3:>8.1f} {flush * 1e3:>7.1f} {walk * 1e3:>12.1f}", flush=True)
        coll.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
