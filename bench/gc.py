#!/usr/bin/env python3
"""Conntrack GC: ways to clean a full map, side by side in one run.

    .venv/bin/python bench/gc.py [--sizes 1048576,4194304] [--expired 0.1] [--cpu 1]
                                 [--family ipv4|ipv6|both]

Every method runs pinned to one CPU beside a probe process pinned to the same CPU that
sleeps 1 ms in a loop (bench/gap_probe.py); "worst gap" is the probe's largest time
between two wake-ups during the method: how long the method held the CPU at a stretch.

For each size and family a real LRU CT map is filled (``tpl_ct4_v1`` with IPv4 tuples,
``tpl_ct6_v1`` with 38-byte IPv6 ones; 10% of entries expired), then, refilling
the deleted entries before each method:
  (a) walk: get_next_key + lookup per entry, delete per expired key (the old way)
  (b) batch lookup, delete per expired key (the reference's current way)
  (c) tuplet's pass, kernel method: the iter/bpf_map_elem program read in slices
      (where the kernel accepts iterator programs)
  (c') tuplet's pass, batch method: batch lookups of 2048 entries, numpy expiry, the
      expired keys deleted by the in-kernel deleter (tpl_ct_gc_keys)
  (d) batch lookup of the whole map and nothing else, in chunks of 2048 (the batch floor)
  (e) the in-kernel walk alone: bpf_for_each_map_elem visiting every entry in one
      program run, reading and deleting nothing (the walk floor; holds its CPU throughout)
  (e') the sliced iterator visiting every entry, deleting nothing (where accepted)
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))
sys.path.insert(0, str(ROOT / "bench"))

from gap_probe import GapProbe  # noqa: E402
from tuplet.agent import log  # noqa: E402
from tuplet.bpf import _libbpf as C  # noqa: E402
from tuplet.bpf.maps import Map  # noqa: E402
from tuplet.conntrack.entries import value_dtype  # noqa: E402
from tuplet.conntrack.gc import CtGc, Method  # noqa: E402
from tuplet.core.errors import TupletError  # noqa: E402
from tuplet.datapath.abi import (
    CT6_MAP_TCP,  # noqa: E402
    CT_MAP_TCP,  # noqa: E402
    OBJ_LXC,  # noqa: E402
)
from tuplet.datapath.clock import monotonic_now  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.config import NodeConfig  # noqa: E402

KEY = np.dtype([("daddr", "<u4"), ("saddr", "<u4"), ("dport", "<u2"), ("sport", "<u2"),
                ("nexthdr", "u1"), ("flags", "u1")])
#: struct ipv6_ct_tuple; entry i's addresses carry i in their last 4 bytes (f00d::/96 style).
KEY6 = np.dtype([("daddr", "V12"), ("dlow", ">u4"), ("saddr", "V12"), ("slow", ">u4"), ("dport", "<u2"),
                 ("sport", "<u2"), ("nexthdr", "u1"), ("flags", "u1")])
#: The table each family's pass is measured on.
TABLES = {"ipv4": CT_MAP_TCP, "ipv6": CT6_MAP_TCP}


def fill(m: Map, n: int, expired_frac: float, now: int, idx: np.ndarray | None = None) -> None:
    """Entries i in idx (all by default); every 1/expired_frac-th one already expired.

    Generated and written a chunk at a time, so the benchmark's own memory stays small
    and the peak RSS it reports is the collector's.
    """
    step = int(round(1 / expired_frac))
    vdt = value_dtype(m)
    total = n if idx is None else len(idx)
    for s in range(0, total, 1 << 16):
        i = (np.arange(s, min(s + (1 << 16), total), dtype=np.uint32) if idx is None
             else idx[s:s + (1 << 16)].astype(np.uint32))
        if m.key_size == KEY.itemsize:
            keys = np.zeros(len(i), KEY)
            keys["daddr"] = 0x0A000000 + (i >> 16)
            keys["saddr"] = 0x0B000000 + (i & 0xFFFF)
        else:
            keys = np.zeros(len(i), KEY6)
            keys["daddr"] = keys["saddr"] = np.void(bytes.fromhex("f00d") + bytes(10))
            keys["dlow"], keys["slow"] = 0x0A000000 + (i >> 16), 0x0B000000 + (i & 0xFFFF)
        keys["dport"], keys["sport"], keys["nexthdr"] = 80, 1234, 6
        vals = np.zeros(len(i), vdt)
        vals["lifetime"] = np.where(i % step == 0, now - 1, now + 3600)
        m.update_batch(keys.tobytes(), vals.tobytes(), len(i))


def expired_index(n: int, frac: float) -> np.ndarray:
    return np.arange(0, n, int(round(1 / frac)))


def walk(m: Map, now: int) -> int:
    """(a) one syscall per key to walk, one per value, one per delete."""
    cur, nxt = None, ctypes.create_string_buffer(m.key_size)
    val = ctypes.create_string_buffer(m.value_size)
    doomed = []
    while C.bpf_map_get_next_key(m.fd, cur, nxt) == 0:
        if C.bpf_map_lookup_elem(m.fd, nxt, val) == 0 and int.from_bytes(val.raw[32:36], "little") < now:
            doomed.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, m.key_size)
    for k in doomed:
        C.bpf_map_delete_elem(m.fd, k)
    return len(doomed)


def batch_then_per_key(m: Map, now: int, chunk: int = 32768) -> int:
    """(b) batch lookup, per-key delete."""
    vdt = value_dtype(m)
    buf, tok, deleted = m.batch_buffers(chunk), None, 0
    while True:
        c, tok2 = m.lookup_batch(buf, tok)
        lt = np.frombuffer(buf.values, vdt, count=c)["lifetime"]
        raw = buf.keys.raw
        for j in np.nonzero(lt < now)[0]:
            k = raw[j * m.key_size:(j + 1) * m.key_size]
            if C.bpf_map_delete_elem(m.fd, k) == 0 or ctypes.get_errno() == errno.ENOENT:
                deleted += 1
        if tok2 is None:
            return deleted
        tok = tok2


def read_only(m: Map, chunk: int = 2048) -> int:
    """(d) the floor: batch-read everything."""
    buf, tok, total = m.batch_buffers(chunk), None, 0
    while True:
        c, tok = m.lookup_batch(buf, tok)
        total += c
        if tok is None:
            return total


A = "(a) per-key walk + per-key delete"
B = "(b) batch lookup + per-key delete"
CK = "(c) tuplet pass, kernel (sliced iterator)"
CB = "(c') tuplet pass, batch + in-kernel delete"
D = "(d) batch read only (floor)"
E = "(e) in-kernel walk only, one run (floor)"
EI = "(e') sliced iterator walk only"
F = "(f) ct flush (Map.clear)"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1048576,4194304")
    ap.add_argument("--expired", type=float, default=0.1)
    ap.add_argument("--skip-walk", action="store_true", help="skip (a), the slowest")
    ap.add_argument("--cpu", type=int, default=1, help="the CPU the methods and the probe share")
    ap.add_argument("--family", choices=["ipv4", "ipv6", "both"], default="both",
                    help="which table: tpl_ct4_v1, tpl_ct6_v1, or each in turn (default)")
    args = ap.parse_args()
    log.configure("warning")
    families = ["ipv4", "ipv6"] if args.family == "both" else [args.family]
    passes: dict[tuple[int, str], float] = {}
    for n in (int(x) for x in args.sizes.split(",")):
        for family in families:
            passes[(n, family)] = measure(n, family, args)
        if len(families) == 2:
            v4, v6 = passes[(n, "ipv4")], passes[(n, "ipv6")]
            print(f"  {n:,} entries: the IPv6 table's pass is {v6 / v4:.2f}x the IPv4 table's (same run)")
    return 0


def measure(n: int, family: str, args: argparse.Namespace) -> float:
    """Every method on one table of ``n`` entries of ``family``; returns tuplet's pass time."""
    table = TABLES[family]
    spec = open_object(OBJ_LXC, NodeConfig(), pin_root=None)
    spec.set_max_entries(table, n + n // 4)   # headroom: no LRU eviction while filling
    coll = spec.load()
    try:
        m = coll.maps[table]
        now = monotonic_now()
        t = time.perf_counter()
        fill(m, n, args.expired, now)
        print(f"\n{n:,} {family} entries in {table} ({args.expired:.0%} expired), filled in "
              f"{time.perf_counter() - t:.1f} s, peak RSS so far {rss_mib():.0f} MiB")
        idx = expired_index(n, args.expired)
        results: dict[str, float] = {}
        gaps: dict[str, float] = {}
        batch = CtGc([m], method=Method.BATCH)
        try:
            kernel: CtGc | None = CtGc([m], method=Method.KERNEL)
        except TupletError as err:
            kernel = None
            print(f"  kernel method unavailable here: {str(err).splitlines()[0][:100]}")
        methods = [(D, lambda: read_only(m)),
                   (E, lambda: batch.walk_only(m)),
                   (CB, lambda: batch.run(now).deleted),
                   (B, lambda: batch_then_per_key(m, now))]
        if kernel is not None:
            methods[2:2] = [(EI, lambda: kernel.iter_walk_only(m)), (CK, lambda: kernel.run(now).deleted)]
        if not args.skip_walk:
            methods.append((A, lambda: walk(m, now)))
        methods.append((F, lambda: m.clear()))
        with GapProbe(args.cpu) as probe:
            for name, fn in methods:
                out, results[name], gaps[name] = probe.measure(fn)
                print(f"  {name:<44} {results[name]:8.3f} s  worst gap {gaps[name] * 1e3:8.1f} ms  "
                      f"({out:,} {'read' if name in (D, E, EI) else 'deleted'})  peak RSS {rss_mib():.0f} MiB")
                fill(m, n, args.expired, now, None if name == F else idx)   # put the deleted entries back
        if kernel is not None:
            kernel.close()
        batch.close()
        cb, b, d, e = results[CB], results[B], results[D], results[E]
        best = results[CK] if kernel is not None else cb
        print(f"  tuplet's pass ({'kernel' if kernel is not None else 'batch'}): {best / e:.2f}x the one-run walk "
              f"floor (e), {best / d:.2f}x the batch floor (d), (b) is {b / best:.2f}x slower")
        return best
    finally:
        coll.close()


if __name__ == "__main__":
    sys.exit(main())
