"""Membership of fixed-size keys in a set of packed keys, vectorised with numpy: which of
a batch of map keys are among another batch's (the live resize's "is this NAT entry
owned by a kept CT entry")."""
from __future__ import annotations

import numpy as np


class KeySet:
    """A set of packed map keys in numpy: sorted 64-bit hashes beside the keys themselves.

    Membership is exact (the key is compared at the hash's place); two keys of the set
    with the same hash only make one of them look absent.
    """

    def __init__(self, key_size: int, parts: list[bytes]) -> None:
        self.key_size = key_size
        raw = b"".join(parts)
        h = key_hashes(raw, key_size)
        order = np.argsort(h)
        self.hashes = h[order]
        self.keys = np.frombuffer(raw, dtype=f"S{key_size}")[order]

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, raw: bytes) -> np.ndarray:
        """For each packed key of raw: is it in the set?"""
        h = key_hashes(raw, self.key_size)
        if not len(self.hashes):
            return np.zeros(len(h), bool)
        order = np.argsort(h)   # sorted needles: each search starts where the last ended
        idx = np.empty(len(h), np.intp)
        idx[order] = np.minimum(np.searchsorted(self.hashes, h[order]), len(self.hashes) - 1)
        found: np.ndarray = (self.hashes[idx] == h) & (self.keys[idx] == np.frombuffer(raw, dtype=f"S{self.key_size}"))
        return found


_MIX = np.uint64(0x9E3779B97F4A7C15)


def key_hashes(raw: bytes, key_size: int) -> np.ndarray:
    """A 64-bit hash of each packed key (vectorised; sorts and searches far faster than bytes)."""
    n = len(raw) // key_size
    words = -(-key_size // 8)
    buf = np.zeros((n, words * 8), np.uint8)
    buf[:, :key_size] = np.frombuffer(raw, np.uint8, n * key_size).reshape(n, key_size)
    h = np.zeros(n, np.uint64)
    for col in buf.view("<u8").T:
        h = (h ^ col) * _MIX
        h ^= h >> np.uint64(29)
    return h
