"""Which backends established service flows still use: a removed backend is kept
("draining") while a conntrack entry of a service flow names it."""
from __future__ import annotations

import numpy as np

from tuplet.datapath import cttables
from tuplet.datapath.abi import TUPLE_F_SERVICE
from tuplet.datapath.layouts import CtEntry
from tuplet.datapath.paths import is_pinned, open_pinned


def backend_ids_in_use(pin_root: str) -> set[int]:
    """Backend ids named by conntrack entries of service flows (both families' tables)."""
    used: set[int] = set()
    off = CtEntry.backend_id.offset
    for name in cttables.NAMES:
        if not is_pinned(pin_root, name):
            continue
        with open_pinned(pin_root, name) as ct:
            ks, vs = ct.key_size, ct.value_buf_size
            flags_at = ks - 1   # the last byte of both families' tuple
            for keys, vals, n in ct.batches(2048):   # a CT table: at most ~3 ms a call (conntrack.sentinels)
                k = np.frombuffer(keys, np.uint8).reshape(n, ks)
                v = np.frombuffer(vals, np.uint8).reshape(n, vs)
                svc = (k[:, flags_at] & TUPLE_F_SERVICE) != 0
                ids = v[svc, off:off + 8].copy().view(np.uint64).ravel()
                used.update(int(i) for i in np.unique(ids))
    return used
