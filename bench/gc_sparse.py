#!/usr/bin/env python3
"""GC over a nearly empty large table: how long does one system call hold the CPU?

    .venv/bin/python bench/gc_sparse.py [--sizes 4194304,8388608,16777216] [--live 0,1000] [--sentinels off,on]

A hash map has a bucket per entry of capacity (rounded up to a power of two), and the
kernel's BPF_MAP_LOOKUP_BATCH walks empty buckets without returning: its ``count``
bounds the entries copied, not the buckets visited. So on a nearly empty table one
batch call of GC's 2048 entries walks long runs of empty buckets at once. For each size
and number of live entries (10% of them expired) this prints the longest single call
of: BPF_MAP_LOOKUP_BATCH (GC's chunk of 2048, and 256), BPF_MAP_GET_NEXT_KEY, a whole GC
pass (batch method; its worst call is the lookup's), ``ct flush`` (Map.clear), and the
one-run in-kernel walk (bench/gc.py's floor). The kernel here does not preempt a system
call, so a call's wall time is the time it held its CPU (interrupts aside).

Each size runs twice, on a fresh map each time: ``off``, the table as it was before
sentinels, and ``on``, with tuplet's sentinel entries (tuplet.conntrack.sentinels: one per
1024 buckets, never listed, counted, flushed or collected). ``flush`` is `ct flush`'s
Flusher, which keeps the sentinels.
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
from tuplet.conntrack import sentinels  # noqa: E402
from tuplet.conntrack.flush import Flusher  # noqa: E402
from tuplet.conntrack.gc import CtGc, Method  # noqa: E402
from tuplet.datapath.abi import CT_MAP_TCP, OBJ_LXC  # noqa: E402
from tuplet.datapath.clock import monotonic_now  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.config import NodeConfig  # noqa: E402

SENTINEL_MIN_BUCKETS = sentinels.MIN_BUCKETS


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


def batch_calls(m: Map, chunk: int) -> tuple[float, float]:
    """The longest BPF_MAP_LOOKUP_BATCH call of a whole read, in seconds: wall time and
    the calling thread's CPU time (the latter leaves out time this shared machine gave to
    others during the call)."""
    buf, tok, worst, cpu = m.batch_buffers(chunk), None, 0.0, 0.0
    while True:
        t, c = time.perf_counter(), time.thread_time()
        _, tok = m.lookup_batch(buf, tok)
        worst, cpu = max(worst, time.perf_counter() - t), max(cpu, time.thread_time() - c)
        if tok is None:
            return worst, cpu


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
    ap.add_argument("--sentinels", default="off,on")
    args = ap.parse_args()
    log.configure("warning")
    fill = bench_gc().fill
    print(f"{'capacity':>11} {'sentinels':>9} {'live':>6}  longest call, ms: {'batch 2048':>10} {'(cpu)':>6} {'batch 256':>9} "
          f"{'next_key':>8} {'GC pass':>8} {'flush':>7} {'walk (1 run)':>12}")
    for n in (int(x) for x in args.sizes.split(",")):
        for mode in args.sentinels.split(","):
            # off: as before sentinels (GC would otherwise top them up: it treats a 16 Mi
            # tpl_ct4_v1 as the agent's, which has them).
            sentinels.MIN_BUCKETS = SENTINEL_MIN_BUCKETS if mode == "on" else 1 << 40
            spec = open_object(OBJ_LXC, NodeConfig(), pin_root=None)
            spec.set_max_entries(CT_MAP_TCP, n)
            coll = spec.load()
            m = coll.maps[CT_MAP_TCP]
            calls = Worst(m)
            with CtGc([m], method=Method.BATCH) as g:
                for live in (int(x) for x in args.live.split(",")):
                    now = monotonic_now()
                    m.clear()
                    ns = sentinels.seed(m) if mode == "on" else 0
                    if live:
                        fill(m, live, 0.1, now)
                    (b2048, c2048), (b256, _), nk = batch_calls(m, 2048), batch_calls(m, 256), next_key_calls(m)
                    walk = timed(lambda: g.walk_only(m))
                    gc_pass = calls.during(lambda: g.run(now))   # its longest lookup (the deleter runs are short)
                    flush = Flusher([m]).flush().longest_step_s   # ct flush: lookups and deletes of 1024
                    left = sentinels.count_live(m)
                    assert left == 0, f"flush left {left} entries"
                    label = f"{ns:,}" if mode == "on" else "off"
                    print(f"{n:>11,} {label:>9} {live:>6}  {'':17} {b2048 * 1e3:>10.1f} {c2048 * 1e3:>6.1f} "
                          f"{b256 * 1e3:>9.1f} {nk * 1e3:>8.1f} {gc_pass * 1e3:>8.1f} {flush * 1e3:>7.1f} {walk * 1e3:>12.1f}",
                          flush=True)
            coll.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
