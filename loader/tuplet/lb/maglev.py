"""Maglev consistent-hashing lookup tables for services, computed with numpy.

A service's Maglev table has ``M`` slots (``M`` prime). The datapath hashes a flow's
tuple to a slot and sends the flow to the backend stored there, so every backend
owns about ``M/n`` slots and removing a backend remaps (almost) only its slots.

How a table is filled (Maglev, Eisenbud et al., NSDI 2016, section 3.4):

* Every backend gets a permutation of the ``M`` slots from two hashes of its name::

      offset         = h1(name) mod M
      skip           = h2(name) mod (M - 1) + 1
      permutation[j] = (offset + j * skip) mod M        j = 0 .. M-1

  ``M`` prime makes every ``skip`` coprime with ``M``, so each permutation visits
  every slot exactly once.
* Backends take turns. On its turn a backend claims the first slot of its
  permutation that nobody has claimed yet, and remembers how far it got. Turns go
  round until all ``M`` slots are claimed.

Choices made here (all part of the table's definition, so changing one changes
every table):

* ``h1``/``h2`` are the two little-endian 64-bit halves of
  ``blake2b(encoding, digest_size=16, person=b"tuplet-maglev")``. The encoding is
  ``b"i" + decimal digits`` for an integer (``b"i-5"`` for -5), ``b"s" + UTF-8`` for
  a ``str`` and ``b"b" + bytes`` for ``bytes``; so ``5``, ``"5"`` and ``b"5"`` are
  three different backends. Python's ``hash()`` is never used, so tables are the
  same in every process and Python version.
* The order of the input does not matter: backends take their turns in a
  canonical order, sorted by their blake2b digest (ties, which do not happen in
  practice, by encoding). Duplicates are an error.
* Weights (optional, ``0 .. 65535``, default 1 each) are turns per round. A round
  is made of levels ``1 .. max(weights)``; level ``l`` gives one turn, in canonical
  order, to every backend whose weight is at least ``l``. A backend of weight ``w``
  ends up with about ``M * w / sum(weights)`` slots. Weight 0 takes a backend out
  of the table (its slots go to the others exactly as if it had been removed).
  With all weights equal to 1 this is plain Maglev.

What the table holds: see :func:`build_table` (backend ids when every backend is
an integer id, else indices) and :func:`build_index_table` (always indices).

No backends (or all weights 0) gives an empty table, ``numpy.zeros(0, uint32)``:
the caller must treat such a service as having no backend rather than write a
table.

The fill is exact: slot for slot the sequential algorithm above (tests/test_maglev.py
checks it against a plain-Python version). The late phase of the fill, where the
classic loop spends most of its probes, is done with numpy; see :func:`_fill`.
A 16381-slot table takes ~5 ms for 10 backends, ~7.5 ms for 100 and ~12 ms for
1000 on a small 2-core machine.
"""
from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from typing import Union

import numpy as np
import numpy.typing as npt

Backend = Union[int, str, bytes]

#: Default table size: a prime, ~164 slots per backend at 100 backends.
DEFAULT_M = 16381
#: Largest table size accepted (2**20; a table that size takes about a second to build).
MAX_M = 1 << 20
#: Largest weight accepted (weights are 16-bit).
MAX_WEIGHT = 0xFFFF
#: Largest backend id a table of ids can hold.
MAX_ID = 0xFFFFFFFF

_PERSON = b"tuplet-maglev"

__all__ = [
    "DEFAULT_M", "MAX_M", "MAX_WEIGHT", "Backend",
    "build_table", "build_index_table", "shares", "is_prime", "next_prime",
    "permutation_params",
]


# --------------------------------------------------------------------- primes

def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (deterministic Miller-Rabin, exact for every n < 3.3e24)."""
    n = int(n)
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(n: int) -> int:
    """The smallest prime >= ``n`` (e.g. ``next_prime(100 * backends)`` for a table size)."""
    n = max(2, int(n))
    while not is_prime(n):
        n += 1
    return n


def _check_m(m: int) -> int:
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        raise ValueError(f"Maglev table size M must be an integer, not {type(m).__name__}")
    m = int(m)
    if m > MAX_M:
        raise ValueError(f"Maglev table size M={m} is larger than the maximum {MAX_M}")
    if not is_prime(m):
        hint = f"; the next prime is {next_prime(m)}" if m >= 2 else ""
        raise ValueError(f"Maglev table size M={m} is not prime{hint}")
    return m


# ------------------------------------------------------------------- hashing

def _encode(backend: Backend) -> bytes:
    if isinstance(backend, bool):
        raise TypeError("a Maglev backend must be an int id, str or bytes, not bool")
    if isinstance(backend, numbers.Integral):
        return b"i" + str(int(backend)).encode("ascii")
    if isinstance(backend, str):
        return b"s" + backend.encode("utf-8")
    if isinstance(backend, (bytes, bytearray, memoryview)):
        return b"b" + bytes(backend)
    raise TypeError(f"a Maglev backend must be an int id, str or bytes, not {type(backend).__name__}")


def _digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=16, person=_PERSON).digest()


def permutation_params(backend: Backend, m: int = DEFAULT_M) -> tuple[int, int]:
    """``(offset, skip)`` of ``backend``'s permutation in a table of ``m`` slots."""
    m = _check_m(m)
    d = _digest(_encode(backend))
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little")
    return h1 % m, h2 % (m - 1) + 1


# ----------------------------------------------------------------- validation

def _prepare(backends: Sequence[Backend], m: int,
             weights: Sequence[int] | None) -> tuple[int, list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Validate, and return (m, canonical order of input indices, offsets, skips, weights)."""
    m = _check_m(m)
    backends = list(backends)
    keys = [_encode(b) for b in backends]
    seen: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            raise ValueError(f"Maglev backend {backends[i]!r} given twice "
                             f"(positions {seen[k]} and {i})")
        seen[k] = i
    if weights is None:
        w = [1] * len(backends)
    else:
        w = list(weights)
        if len(w) != len(backends):
            raise ValueError(f"{len(w)} Maglev weights for {len(backends)} backends")
        for i, x in enumerate(w):
            if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= x <= MAX_WEIGHT:
                raise ValueError(f"Maglev weight {x!r} of backend {backends[i]!r} is not an "
                                 f"integer in [0, {MAX_WEIGHT}]")
        w = [int(x) for x in w]
    active = [i for i in range(len(backends)) if w[i] > 0]
    if len(active) > m:
        raise ValueError(f"Maglev table size M={m} is smaller than the number of backends "
                         f"({len(active)}); use M >= 100 * backends, e.g. {next_prime(100 * len(active))}")
    digests = {i: _digest(keys[i]) for i in active}
    order = sorted(active, key=lambda i: (digests[i], keys[i]))
    offsets = np.empty(len(order), np.int64)
    skips = np.empty(len(order), np.int64)
    for j, i in enumerate(order):
        d = digests[i]
        offsets[j] = int.from_bytes(d[:8], "little") % m
        skips[j] = int.from_bytes(d[8:], "little") % (m - 1) + 1
    return m, order, offsets, skips, np.array([w[i] for i in order], np.int64)


def _round_turns(weights: np.ndarray, m: int) -> np.ndarray:
    """One round's turns (canonical backend positions), level by level in canonical order.

    A round longer than ``m`` turns is cut at ``m``: the table is full before the
    rest of it could matter. This keeps huge weights cheap.
    """
    n = weights.size
    if n == 0:
        return np.zeros(0, np.int64)
    maxw = int(weights.max())
    if maxw == 1:
        return np.arange(n, dtype=np.int64)
    # Backends taking part in each level, and the last level the table can reach.
    per_level = n - np.searchsorted(np.sort(weights), np.arange(1, maxw + 1), side="left")
    last = min(maxw, int(np.searchsorted(np.cumsum(per_level), m, side="left")) + 1)
    w = np.minimum(weights, last)
    who = np.repeat(np.arange(n, dtype=np.int64), w)
    level = np.arange(who.size) - np.repeat(np.cumsum(w) - w, w)
    return who[np.lexsort((who, level))][:m]


# ----------------------------------------------------------------------- fill

def _fill(m: int, offsets: np.ndarray, skips: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Owner (canonical position) of every slot, exactly as the sequential Maglev fill.

    The fill is sequential by nature: every claim depends on all earlier ones.
    Its cost in the classic loop is the probing (about M ln M probes in all), and
    nearly all of it comes at the end, when few slots are free and each claim
    scans ~M/free positions of a permutation. So:

    1. While more than ``F0 = ceil(M/n)`` slots are free, the classic loop runs
       (probes are short there).
    2. Then numpy computes, for every backend, where each of the ``F0`` free slots
       sits in its permutation (``pos = (slot - offset) * skip^-1 mod M``, M prime)
       and sorts them. A backend's next claim is the free slot of lowest position
       (every slot before its pointer is taken), so the rest of the fill walks
       these short sorted lists instead of probing whole permutations.

    A pure numpy formulation (all turns of a round resolved together, the round
    split at the first two turns wanting one slot) measured 25 ms for M=16381,
    n=100, the classic loop alone 9 ms, this 7.5 ms (4.5 against 6 at n=10).
    """
    n = offsets.size
    if n == 1:
        return np.zeros(m, np.int64)
    off = offsets.tolist()
    skip = skips.tolist()
    tl = turns.tolist()
    entry = [-1] * m
    nxt = [0] * n
    filled = 0
    stop = m - min(m, -(-m // n))
    taken_turns = 0
    while filled < stop:                        # phase 1: classic loop
        for b in tl:
            o = off[b]
            s = skip[b]
            j = nxt[b]
            c = (o + j * s) % m
            while entry[c] >= 0:
                j += 1
                c = (o + j * s) % m
            entry[c] = b
            nxt[b] = j + 1
            filled += 1
            taken_turns += 1
            if filled == stop:
                break
    if filled < m:                              # phase 2: sorted preference lists
        free = np.nonzero(np.asarray(entry, np.int64) < 0)[0]
        inv = np.array([pow(s, m - 2, m) for s in skip], np.int64)
        pos = (free[None, :] - offsets[:, None]) % m * inv[:, None] % m
        pref = np.take(free, np.argsort(pos, axis=1, kind="stable")).tolist()
        ptr = [0] * n
        seq = tl[taken_turns % len(tl):]
        while filled < m:
            for b in seq:
                row = pref[b]
                i = ptr[b]
                x = row[i]
                while entry[x] >= 0:
                    i += 1
                    x = row[i]
                entry[x] = b
                ptr[b] = i + 1
                filled += 1
                if filled == m:
                    break
            seq = tl
    return np.asarray(entry, np.int64)


# ------------------------------------------------------------------------ API

def build_index_table(backends: Sequence[Backend], m: int = DEFAULT_M,
                      weights: Sequence[int] | None = None) -> npt.NDArray[np.uint32]:
    """The Maglev table as indices into ``backends``: ``table[slot]`` = i means ``backends[i]``.

    Which backend owns a slot does not depend on the order of ``backends`` (only
    the index numbers do). Raises ValueError if ``m`` is not a prime in
    ``[2, MAX_M]``, if ``m`` is smaller than the number of backends with a weight
    above 0, for duplicate backends or bad weights; TypeError for a backend that is
    not int, str or bytes. Returns an empty array when no backend has weight > 0.
    """
    m, order, offsets, skips, w = _prepare(backends, m, weights)
    if not order:
        return np.zeros(0, np.uint32)
    owner = _fill(m, offsets, skips, _round_turns(w, m))
    out: np.ndarray[tuple[int], np.dtype[np.uint32]] = np.asarray(order, np.uint32)[owner]
    return out


def _all_ids(backends: Sequence[Backend]) -> bool:
    return all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in backends)


def build_table(backends: Sequence[Backend], m: int = DEFAULT_M,
                weights: Sequence[int] | None = None) -> npt.NDArray[np.uint32]:
    """The Maglev lookup table: ``M`` uint32 entries, one per slot.

    If every backend is an integer it is taken as the backend's id (0 .. 2**32-1)
    and each slot holds the id of the backend that owns it, ready to be written
    into the datapath's array of slots. If any backend is a str or bytes, slots
    hold indices into ``backends`` instead (as :func:`build_index_table` always
    does). The table does not depend on the order of ``backends``.

    ``weights`` (optional, one per backend, 0 .. 65535) are turns per round; 0
    leaves the backend out. No backends, or all weights 0, gives an empty array.
    See :func:`build_index_table` for the errors raised.

    Without weights every backend owns floor(M/n) or ceil(M/n) slots, so shares
    are within 1% of M/n when M >= 100 * n; smaller M is accepted (down to M = n).
    """
    backends = list(backends)
    ids = _all_ids(backends)
    if ids:
        for b in backends:
            if not 0 <= int(b) <= MAX_ID:
                raise ValueError(f"Maglev backend id {b!r} is outside [0, {MAX_ID}]")
    table = build_index_table(backends, m, weights)
    if ids and table.size:
        return np.asarray([int(b) for b in backends], np.uint32)[table]
    return table


def shares(table: npt.ArrayLike, backends: Sequence[Backend], *,
           indices: bool | None = None) -> dict[Backend, int]:
    """Slots owned by each backend, in the order of ``backends`` (0 for those without).

    ``table`` is read as :func:`build_table` wrote it for ``backends`` (ids when
    every backend is an integer, else indices); pass ``indices=True`` for a table
    from :func:`build_index_table`. Raises ValueError if the table holds an entry
    that is none of ``backends``. Divide by ``len(table)`` for fractions.
    """
    backends = list(backends)
    t = np.asarray(table).astype(np.int64, copy=False).ravel()
    if indices is None:
        indices = not _all_ids(backends)
    if indices:
        keys = np.arange(len(backends), dtype=np.int64)
    else:
        keys = np.asarray([int(b) for b in backends], np.int64).reshape(-1)
    values, counts = np.unique(t, return_counts=True)
    known = np.isin(values, keys)
    if not known.all():
        bad = values[~known][:5].tolist()
        what = "indices" if indices else "ids"
        raise ValueError(f"Maglev table holds {what} {bad} that are not among the {len(backends)} backends")
    count_of = dict(zip(values.tolist(), counts.tolist()))
    return {b: int(count_of.get(int(k), 0)) for b, k in zip(backends, keys.tolist())}
