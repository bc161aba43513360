"""Maglev lookup tables (tuplet.maglev): balance, disruption, determinism, validation,
weights, and equality with a plain-Python reference fill written here from the paper."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuplet.lb import maglev
from tuplet.lb.maglev import DEFAULT_M, build_index_table, build_table, is_prime, next_prime, shares

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ reference

def _ref_key(backend) -> bytes:
    """The documented stable encoding, written out again here on purpose."""
    if isinstance(backend, int):
        return b"i" + str(backend).encode()
    if isinstance(backend, str):
        return b"s" + backend.encode()
    return b"b" + bytes(backend)


def _ref_hashes(backend) -> tuple[bytes, int, int]:
    d = hashlib.blake2b(_ref_key(backend), digest_size=16, person=b"tuplet-maglev").digest()
    return d, int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def reference_table(backends, m, weights=None) -> list[int]:
    """Maglev's populate loop, one slot at a time, returning indices into ``backends``.

    Turn order: backends sorted by digest; a round is levels 1..max(weight), level l
    giving one turn to each backend of weight >= l.
    """
    if weights is None:
        weights = [1] * len(backends)
    live = []
    for i, b in enumerate(backends):
        if weights[i] > 0:
            d, h1, h2 = _ref_hashes(b)
            live.append((d, _ref_key(b), i, h1 % m, h2 % (m - 1) + 1))
    live.sort()
    if not live:
        return []
    nxt = [0] * len(live)
    entry = [-1] * m
    filled = 0
    top = max(weights[x[2]] for x in live)
    while True:
        for level in range(1, top + 1):
            for j, (_d, _k, i, offset, skip) in enumerate(live):
                if weights[i] < level:
                    continue
                c = (offset + nxt[j] * skip) % m
                while entry[c] >= 0:
                    nxt[j] += 1
                    c = (offset + nxt[j] * skip) % m
                entry[c] = i
                nxt[j] += 1
                filled += 1
                if filled == m:
                    return entry


# ------------------------------------------------------ equality with reference

@pytest.mark.parametrize("m", [251, 1021])
def test_matches_reference_unweighted(m):
    for n in range(1, 21):
        backends = [1000 + 7 * i for i in range(n)]
        assert build_index_table(backends, m).tolist() == reference_table(backends, m), (m, n)


@pytest.mark.parametrize("m", [251, 1021])
def test_matches_reference_weighted(m):
    rng = random.Random(m)
    for n in range(1, 21):
        backends = [f"backend-{i}" for i in range(n)]
        weights = [rng.choice([0, 1, 1, 2, 3, 5]) for _ in range(n)]
        want = reference_table(backends, m, weights)
        assert build_index_table(backends, m, weights).tolist() == want, (m, n, weights)


def test_matches_reference_edges():
    # Tiny primes, n == M (one slot each), mixed key types, one heavy weight.
    assert build_index_table([5, 6], 2).tolist() == reference_table([5, 6], 2)
    assert build_index_table([5, 6, 7], 3).tolist() == reference_table([5, 6, 7], 3)
    full = list(range(251))
    assert build_index_table(full, 251).tolist() == reference_table(full, 251)
    mixed = [3, "3", b"3", "été", b"\x00\xff"]
    assert build_index_table(mixed, 1021).tolist() == reference_table(mixed, 1021)
    w = [1000, 1, 1, 0, 2]
    assert build_index_table(mixed, 1021, w).tolist() == reference_table(mixed, 1021, w)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40, unique=True),
       m=st.sampled_from([41, 251, 509, 1021]),
       data=st.data())
def test_matches_reference_hypothesis(ids, m, data):
    if len(ids) > m:
        ids = ids[:m]
    weights = data.draw(st.one_of(st.none(),
                                  st.lists(st.integers(0, 4), min_size=len(ids), max_size=len(ids))))
    want = reference_table(ids, m, weights)
    got = build_index_table(ids, m, weights).tolist()
    assert got == want


def test_permutation_params_are_documented_hash():
    for b in (0, 1, 2**32 - 1, "web", b"\x01"):
        _d, h1, h2 = _ref_hashes(b)
        assert maglev.permutation_params(b, 16381) == (h1 % 16381, h2 % 16380 + 1)


# ------------------------------------------------------------------- balance

def test_balance_every_n_up_to_100():
    m = DEFAULT_M
    for n in range(1, 101):
        backends = list(range(1, n + 1))
        table = build_table(backends, m)
        assert table.shape == (m,) and table.dtype == np.uint32
        counts = np.array(list(shares(table, backends).values()))
        assert counts.sum() == m
        ideal = m / n
        # Every round gives every backend exactly one slot, so shares differ by at most 1 ...
        assert counts.max() - counts.min() <= 1, n
        # ... which is within 1% of M/n as long as M/n >= 100.
        assert np.all(np.abs(counts - ideal) <= 0.01 * ideal), (n, counts.min(), counts.max())


# ---------------------------------------------------------------- disruption
#
# Removing backend X frees exactly X's slots, but the fill is a sequence of turns,
# so it is not exactly "X's slots and nothing else": a freed slot is now claimed by
# some backend A on an earlier turn than A reached it before, so A's later claims
# fall one step further along its permutation, taking slots others had, and the
# cascade goes on until it happens to land on a slot freed by X. Claims are close to
# uniformly random free slots, so cascades are short, and they happen mostly in the
# late fill where few slots are free. What we measured (M=16381, 30 random removals
# or additions per n, slots that moved between two *remaining* backends, max):
#
#     n        2   3    5    10   20   50   100  200  500  1000
#     remove   0   8    61   90   133  189  231  307  193  117
#     add      65  62   155  124  186  192  229  298  195  114
#
# i.e. at most ~1.9% of M (309 slots, n=200, in the test below). It grows with n
# while each backend's slot count M/n is large, then shrinks again as turns per
# backend get few. The bound asserted below, 3% of M, leaves ~1.6x headroom over the
# worst case seen; the tables are deterministic, so the test cannot flake. A
# regression that lost Maglev's stability fails it by far: permutations derived from
# list positions instead of backend names move 14541 (n=10) and 16212 (n=100) of the
# 16381 slots on removing the first backend, as a modulo hash moves ~(n-1)/n of them.
# (The turn order alone matters little: taking turns in list order instead of the
# canonical order measured 79 and 200.)

COLLATERAL_BOUND = 0.03


@pytest.mark.parametrize("n", [10, 50, 100, 200])
def test_disruption_on_removal(n):
    m = DEFAULT_M
    backends = list(range(1, n + 1))
    table = build_table(backends, m)
    rng = random.Random(n)
    worst = 0
    for victim in rng.sample(backends, 5):
        after = build_table([b for b in backends if b != victim], m)
        own = table == victim
        assert not np.any(after == victim)
        # all of its slots moved, to several backends, not one
        assert len(np.unique(after[own])) > min(n - 1, 5)
        collateral = int(np.count_nonzero(after[~own] != table[~own]))
        worst = max(worst, collateral)
        # Stays balanced among the n-1 survivors.
        counts = np.array(list(shares(after, [b for b in backends if b != victim]).values()))
        assert counts.max() - counts.min() <= 1
    print(f"n={n}: removing one backend moved at most {worst} other slots "
          f"({100 * worst / m:.2f}% of M={m}, {worst / (m / n):.2f}x M/n)")
    assert worst < COLLATERAL_BOUND * m


@pytest.mark.parametrize("n", [10, 50, 100, 200])
def test_disruption_on_addition(n):
    m = DEFAULT_M
    backends = list(range(1, n + 1))
    table = build_table(backends, m)
    worst = 0
    for new in (10_001, 20_002, 30_003, 40_004, 50_005):
        after = build_table(backends + [new], m)
        gained = np.count_nonzero(after == new)
        assert abs(gained - m / (n + 1)) <= 1
        collateral = int(np.count_nonzero((after != table) & (after != new)))
        worst = max(worst, collateral)
    print(f"n={n}: adding one backend moved at most {worst} slots between old backends "
          f"({100 * worst / m:.2f}% of M={m})")
    assert worst < COLLATERAL_BOUND * m


# --------------------------------------------------------------- determinism

def test_golden_tables():
    # Pinned: any change to the hash, the encoding or the turn order changes these.
    t = build_table(list(range(1, 11)), 251)
    assert t[:20].tolist() == [10, 9, 7, 1, 2, 2, 3, 3, 5, 1, 4, 6, 1, 4, 2, 9, 2, 6, 1, 10]
    assert hashlib.sha256(t.tobytes()).hexdigest() == \
        "f562173b27a87c15bbc755cffd28716ea7642769a22b53e35181b30ab3b2b12e"
    t = build_table(["web-1", "web-2", b"\x01\x02", "été"], 1021)
    assert hashlib.sha256(t.tobytes()).hexdigest() == \
        "097163a89632b1ba2c0a94a6e729ff25b50c821c657394423839ad222c36db72"


def test_same_in_another_process_with_random_hash_seed():
    code = ("import hashlib, sys; sys.path.insert(0, sys.argv[1]);"
            "from tuplet.lb.maglev import build_table;"
            "print(hashlib.sha256(build_table(['a', 'b', 'c', 'd'], 1021).tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="random")
    outs = {subprocess.run([sys.executable, "-c", code, str(ROOT / "loader")], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    here = hashlib.sha256(build_table(["a", "b", "c", "d"], 1021).tobytes()).hexdigest()
    assert outs == {here}


def test_input_order_does_not_matter():
    ids = list(range(100, 160))
    table = build_table(ids, 1021)
    rng = random.Random(3)
    for _ in range(5):
        shuffled = ids[:]
        rng.shuffle(shuffled)
        assert np.array_equal(build_table(shuffled, 1021), table)
    # Index tables renumber, but every slot names the same backend.
    names = [f"pod-{i}" for i in range(30)]
    rev = names[::-1]
    a = build_index_table(names, 1021)
    b = build_index_table(rev, 1021)
    assert [names[i] for i in a] == [rev[i] for i in b]
    w = list(range(1, 31))
    assert np.array_equal(np.asarray(names)[build_index_table(names, 1021, w)],
                          np.asarray(rev)[build_index_table(rev, 1021, w[::-1])])


def test_ids_vs_indices():
    ids = [7, 3, 99]
    t = build_table(ids, 251)
    i = build_index_table(ids, 251)
    assert np.array_equal(t, np.asarray(ids, np.uint32)[i])
    assert set(t.tolist()) == {7, 3, 99}
    # Any non-integer backend: indices.
    s = build_table(["x", "y", 3], 251)
    assert set(s.tolist()) == {0, 1, 2}
    assert np.array_equal(s, build_index_table(["x", "y", 3], 251))
    assert np.array_equal(build_table([np.uint32(7), np.int64(3), 99], 251), t)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("m", [0, 1, -7, 4, 100, 16383, 16384, 65535])
def test_m_not_prime(m):
    with pytest.raises(ValueError, match="not prime"):
        build_table([1, 2], m)


def test_m_errors():
    with pytest.raises(ValueError, match="next prime is 16411"):
        build_table([1], 16383 + 20)  # 16403 = 47 * 349
    with pytest.raises(ValueError, match="must be an integer"):
        build_table([1], 251.0)
    with pytest.raises(ValueError, match="must be an integer"):
        build_table([1], True)
    with pytest.raises(ValueError, match="larger than the maximum"):
        build_table([1], next_prime(maglev.MAX_M + 1))
    with pytest.raises(ValueError, match="smaller than the number of backends"):
        build_table([1, 2, 3, 4, 5], 3)
    with pytest.raises(ValueError, match="not prime"):
        build_table([], 4)  # M is checked even with nothing to place
    # M == n is allowed (one slot each); weight-0 backends do not count.
    assert sorted(build_table([1, 2, 3], 3).tolist()) == [1, 2, 3]
    assert sorted(build_table([1, 2, 3, 4, 5], 3, [1, 1, 1, 0, 0]).tolist()) == [1, 2, 3]


def test_backend_errors():
    with pytest.raises(ValueError, match="given twice"):
        build_table([1, 2, 1])
    with pytest.raises(ValueError, match="given twice"):
        build_table(["a", "a"])
    with pytest.raises(ValueError, match="outside"):
        build_table([-1, 2])
    with pytest.raises(ValueError, match="outside"):
        build_table([2**32])
    with pytest.raises(TypeError):
        build_table([1.5])
    with pytest.raises(TypeError):
        build_table([True, 2])
    # Negative or huge ints are fine as names in an index table.
    assert build_index_table([-1, 2**40], 251).size == 251


def test_weight_errors():
    with pytest.raises(ValueError, match="2 Maglev weights for 3 backends"):
        build_table([1, 2, 3], 251, [1, 1])
    for bad in (-1, 65536, 1.5, True):
        with pytest.raises(ValueError, match="weight"):
            build_table([1, 2], 251, [1, bad])


def test_empty():
    for t in (build_table([]), build_table([1, 2], 251, [0, 0]), build_index_table([])):
        assert t.shape == (0,) and t.dtype == np.uint32
    assert shares(build_table([]), []) == {}
    assert shares(build_table([1, 2], 251, [0, 0]), [1, 2]) == {1: 0, 2: 0}


def test_primes():
    assert [p for p in range(60) if is_prime(p)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37,
                                                     41, 43, 47, 53, 59]
    assert all(is_prime(p) for p in (251, 1021, 16381, 65537, 131071, 1048573, 2**61 - 1))
    assert not any(is_prime(c) for c in (16383, 65535, 3215031751, 561, 1105, 2**61 + 1))
    assert next_prime(16382) == 16411 and next_prime(16381) == 16381 and next_prime(-3) == 2


# ------------------------------------------------------------------- weights

def test_weighted_shares():
    m = DEFAULT_M
    backends = list(range(1, 11))
    weights = [1, 2, 3, 4, 5, 0, 1, 10, 7, 2]
    table = build_table(backends, m, weights)
    got = shares(table, backends)
    total = sum(weights)
    for b, w in zip(backends, weights):
        # w slots per full round, at most w in the last, partial round.
        assert abs(got[b] - m * w / total) <= w, (b, w, got[b])
    assert got[6] == 0


def test_weight_zero_is_removal_and_equal_weights_are_plain():
    backends = list(range(1, 41))
    weights = [1] * 40
    weights[17] = 0
    assert np.array_equal(build_table(backends, 1021, weights),
                          build_table(backends[:17] + backends[18:], 1021))
    assert np.array_equal(build_table(backends, 1021, [3] * 40), build_table(backends, 1021))


def test_huge_weights_are_cheap():
    start = time.perf_counter()
    t = build_table(list(range(1, 1001)), DEFAULT_M, [65535] * 999 + [1])
    assert time.perf_counter() - start < 2.0
    # The round (999 * 65535 + 1 turns) is cut at M: the table fills within level 17.
    assert np.count_nonzero(t == 1000) <= 1
    t = build_table([1, 2, 3], 251, [65535, 1, 1])
    assert np.count_nonzero(t == 2) == 1 and np.count_nonzero(t == 3) == 1


# -------------------------------------------------------------------- shares

def test_shares():
    backends = [10, 20, 30]
    table = build_table(backends, 251)
    s = shares(table, backends)
    assert list(s) == backends and sum(s.values()) == 251
    names = ["a", "b", "c"]
    s = shares(build_table(names, 251), names)
    assert list(s) == names and sorted(s.values()) == [83, 84, 84]
    # An index table of integer backends needs indices=True.
    s = shares(build_index_table(backends, 251), backends, indices=True)
    assert sorted(s.values()) == [83, 84, 84]
    with pytest.raises(ValueError, match="not among"):
        shares(build_index_table(backends, 251), backends)
    with pytest.raises(ValueError, match="not among"):
        shares(table, [10, 20])


# ---------------------------------------------------------------------- speed

def test_build_time():
    backends = list(range(1, 101))
    build_table(backends)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        build_table(backends)
        times.append(time.perf_counter() - start)
    best = min(times)
    print(f"build_table(M={DEFAULT_M}, n=100): best {best * 1e3:.1f} ms of 5")
    # ~7.5 ms measured on a 2-core machine; the goal is < 50 ms. Generous for shared CI.
    assert best < 0.25
