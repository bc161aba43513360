"""Sentinel entries: a few never-matching keys that keep a large CT table's empty runs short.

A hash map has a bucket per entry of capacity (a power of two), and the kernel's
BPF_MAP_LOOKUP_BATCH (and get_next_key, and the in-kernel walk) steps over empty buckets
without returning: its ``count`` bounds the entries copied, not the buckets visited. On a
nearly empty 16 Mi table one call of GC, ``ct flush``, ``ct list`` or the resize copy
walks millions of empty buckets at ~1.3 ns each, 20+ ms without a chance to reschedule
(bench/gc_sparse.py). With one sentinel per ``SPACING`` buckets, placed by the map's
per-map random hash seed, the longest empty run is about ``SPACING x ln(sentinels)``
buckets (~10k, ~15 us at 16 Mi), and a call of ``c`` entries walks about ``c x SPACING``
buckets at most (2048: ~3 ms).

The key shape is :func:`tuplet.datapath.abi.ct_sentinel_key` (nexthdr 0 and flag
TUPLE_F_SENTINEL: no packet produces it). Their lifetime is ~68 years ahead (wrap-safe),
and GC skips them by key anyway. Every reader that shows or counts entries leaves them
out (:func:`mask`, :func:`count_live`); flushes do not delete them; resize does not copy
them but seeds the new table. LRU maps may evict them under pressure (the table is full
then, so nothing is sparse); every GC pass tops them up when there is room.

Only tables of ``MIN_BUCKETS`` buckets and more get them: below that an empty table's
whole walk is under ~1.5 ms.
"""
from __future__ import annotations

import numpy as np
import structlog

from tuplet.bpf.maps import Map, possible_cpus
from tuplet.datapath import clock, cttables
from tuplet.datapath.abi import TUPLE_F_SENTINEL, ct_sentinel_key
from tuplet.datapath.layouts import CtEntry

log = structlog.get_logger("tuplet.sentinels")

#: Buckets per sentinel.
SPACING = 1024
#: Smallest table (buckets) that gets sentinels.
MIN_BUCKETS = 1 << 20
#: A sentinel's lifetime: this far ahead of now, still "after" now in the signed u32 sense.
AHEAD = (1 << 31) - (1 << 20)
#: Sentinels written per BPF_MAP_UPDATE_BATCH.
CHUNK = 1024
#: Entries per batch lookup of a CT table: with only sentinels in it, one call walks about
#: READ_CHUNK x SPACING buckets (2 Mi, ~3 ms). Readers of CT tables ask for at most 4096.
READ_CHUNK = 2048


def n_buckets(max_entries: int) -> int:
    """The kernel's bucket count for a hash map: max_entries rounded up to a power of two."""
    return 1 << max(0, (max_entries - 1).bit_length())


def expected(max_entries: int) -> int:
    """How many sentinels a CT table of ``max_entries`` holds (0: too small to need any)."""
    b = n_buckets(max_entries)
    return b // SPACING if b >= MIN_BUCKETS else 0


def applies(m: Map) -> bool:
    return cttables.is_ct(m.name) and expected(m.max_entries) > 0


def raw_mask(keys: bytes | memoryview, key_size: int, count: int) -> np.ndarray:
    """Which of ``count`` packed CT keys (of either family) are sentinels."""
    k = np.frombuffer(keys, np.uint8, count=count * key_size).reshape(count, key_size)
    out: np.ndarray = (k[:, key_size - 1] & TUPLE_F_SENTINEL) != 0   # flags: both tuples' last byte
    return out


def mask(keys: np.ndarray) -> np.ndarray:
    """Which CT keys (a structured array with a ``flags`` field) are sentinels."""
    out: np.ndarray = (keys["flags"] & TUPLE_F_SENTINEL) != 0
    return out


def count_live(m: Map, chunk: int = READ_CHUNK) -> int:
    """Entries of ``m`` that are not sentinels (a walk in batch lookups)."""
    if not cttables.is_ct(m.name):
        return sum(c for _, _, c in m.batches(chunk))
    return sum(c - int(raw_mask(k, m.key_size, c).sum()) for k, _, c in m.batches(chunk))


def _value(now: int | None) -> bytes:
    now = clock.monotonic_now() if now is None else now
    return bytes(CtEntry(lifetime=(now + AHEAD) % clock.U32))


def _write(m: Map, idx: list[int], now: int | None) -> None:
    val = _value(now)
    for i in range(0, len(idx), CHUNK):
        part = idx[i:i + CHUNK]
        m.update_batch(b"".join(ct_sentinel_key(j, m.key_size) for j in part), val * len(part), len(part))


def seed(m: Map, now: int | None = None) -> int:
    """Write every sentinel of a CT table that holds nothing else yet (just created)."""
    if not applies(m):
        return 0
    n = expected(m.max_entries)
    _write(m, list(range(n)), now)
    log.debug("sentinels seeded", map=m.name, sentinels=n)
    return n


def present(m: Map) -> list[int]:
    """The sentinels ``m`` holds (one lookup each)."""
    return [i for i in range(expected(m.max_entries)) if m.lookup(ct_sentinel_key(i, m.key_size)) is not None]


def room(m: Map, live: int) -> bool:
    """Whether every sentinel fits beside ``live`` entries without making an LRU map evict."""
    return live + expected(m.max_entries) + 256 * possible_cpus() < m.max_entries


def top_up(m: Map, live: int, seen: int | None = None, now: int | None = None) -> int:
    """Re-write the missing sentinels of ``m`` when there is room beside ``live`` entries.

    ``seen``: how many a walk just saw (all there: nothing to look up). Returns how many
    were there before (what a walk that counts every entry counted besides ``live``).
    """
    n = expected(m.max_entries) if cttables.is_ct(m.name) else 0
    if not n or seen == n:
        return seen or 0
    have = set(present(m))
    if len(have) < n and room(m, live):
        _write(m, [i for i in range(n) if i not in have], now)
        log.info("sentinels topped up", map=m.name, written=n - len(have), sentinels=n)
    return len(have)
