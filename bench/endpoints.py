#!/usr/bin/env python3
"""Flushing a deleted pod's entries: time, and the longest scheduling gap of a task that
shares the CPU (not a timed test).

    .venv/bin/python bench/endpoints.py [--entries 1048576] [--pod-entries 100000] [--chunk 2048]

A TCP CT table of bpf_lxc.o (LRU hash, the real key/value BTF) sized --entries is filled
to ~95% with entries of other pods, --pod-entries of them of one pod's address; then
that address is flushed (tuplet.conntrack.flush, as `tuplet endpoint delete` does) with
the flusher and a probe task both pinned to CPU 0. The probe spins reading the clock
and reports the longest gap between two readings (the time it was kept off the CPU).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))

from tuplet.conntrack.entries import EntryLayout  # noqa: E402
from tuplet.conntrack.flush import CHUNK, Flusher  # noqa: E402
from tuplet.datapath.abi import CT_MAP_TCP, OBJ_LXC  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.config import parse  # noqa: E402

POD = "10.64.0.80"


def probe(stop: "mp.synchronize.Event", out: "mp.Queue[float]") -> None:
    os.sched_setaffinity(0, {0})
    worst = 0.0
    last = time.perf_counter()
    while not stop.is_set():
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    out.put(worst)


def fill(m, lay: EntryLayout, total: int, pod: int) -> None:
    keys = np.zeros(total, lay.key)
    pod_be = int.from_bytes(socket.inet_aton(POD), "little")
    rng = np.random.default_rng(1)
    keys["daddr"] = rng.integers(1, 2**32 - 1, total, dtype=np.uint32)
    keys["saddr"] = rng.integers(1, 2**32 - 1, total, dtype=np.uint32)
    keys["daddr"][:pod] = pod_be
    keys["sport"] = np.arange(total) & 0xFFFF
    keys["nexthdr"] = 6
    vals = np.zeros(total, lay.value)
    vals["lifetime"] = 10**9
    step = 65536
    for i in range(0, total, step):
        k, v = keys[i:i + step], vals[i:i + step]
        m.update_batch(k.tobytes(), v.tobytes(), len(k))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1 << 20)
    ap.add_argument("--pod-entries", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=CHUNK)
    args = ap.parse_args()
    cfg = parse(f"[conntrack]\ntcp_max = {args.entries}\nsyn_table = false\n")
    spec = open_object(OBJ_LXC, cfg, None)
    coll = spec.load()
    spec.close()
    m = coll.maps[CT_MAP_TCP]
    lay = EntryLayout.of(m)
    total = int(args.entries * 0.95)
    fill(m, lay, total, args.pod_entries)
    print(f"table {m.max_entries} entries, {m.count()} filled, {args.pod_entries} of {POD}; chunk {args.chunk}")
    stop, q = mp.Event(), mp.Queue()
    p = mp.Process(target=probe, args=(stop, q))
    p.start()
    time.sleep(0.5)
    os.sched_setaffinity(0, {0})
    res = Flusher([m], None, chunk=args.chunk).flush([POD])
    time.sleep(0.2)
    stop.set()
    worst = q.get()
    p.join()
    print(f"flushed {res.ct_deleted} entries in {res.duration_s * 1000:.0f} ms, {res.chunks} batch lookups; "
          f"longest single syscall {res.longest_step_s * 1000:.2f} ms; "
          f"worst scheduling gap of a task on the same CPU {worst * 1000:.2f} ms; left {m.count()}")
    coll.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
