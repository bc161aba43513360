"""The datapath's Maglev tables: one inner array map per service and bank, of M backend ids,
held by the outer map-in-map under ``(rev_nat, bank)``."""
from __future__ import annotations

import numpy as np

from tuplet.bpf.maps import ARRAY, F_INNER_MAP, Map
from tuplet.datapath.layouts import Lb4MaglevKey


def read_table(outer: Map, rev_nat: int, bank: int) -> np.ndarray:
    """The live Maglev table of one bank (backend ids), or an empty array."""
    raw = outer.lookup(Lb4MaglevKey(rev_nat, bank, 0))
    if raw is None:
        return np.zeros(0, np.uint32)
    inner_id = int.from_bytes(raw[:4], "little")
    with Map.from_id(inner_id, "maglev") as inner:
        out = np.zeros(inner.max_entries, np.uint32)
        for keys, vals, _ in inner.batches():
            out[np.frombuffer(keys, np.uint32)] = np.frombuffer(vals, np.uint32)
    return out


def put_table(outer: Map, backends: Map, rev_nat: int, bank: int, table: np.ndarray) -> None:
    """A new inner table of len(table) entries, filled, then put under (rev_nat, bank).

    The inner table borrows the backend map's BTF (its key type is __u32, as are the
    table's keys and values) so `bpftool map dump` prints it as numbers. The outer
    map itself has none: BTF is not supported on map-in-map types.
    """
    u32 = backends.info.btf_key_type_id
    inner = Map.create(ARRAY, f"tpl_maglev_{rev_nat}", 4, 4, len(table), flags=F_INNER_MAP, btf_of=backends,
                       btf_key_type_id=u32, btf_value_type_id=u32)
    with inner:
        keys = np.arange(len(table), dtype=np.uint32)
        inner.update_batch(keys.tobytes(), table.astype(np.uint32).tobytes(), len(table))
        outer.update(Lb4MaglevKey(rev_nat, bank, 0), inner.fd.to_bytes(4, "little"))
