"""What the conntrack tables went through, counted by the datapath (bpf/lib/ct_events.h):
entries inserted per table, promotions out of the handshake table, refused inserts."""
from __future__ import annotations

from tuplet.bpf.maps import Map
from tuplet.datapath import enums


def event_names(obj_path: str) -> dict[int, str]:
    """Event indices to names (``insert_syn``, ``promoted``...) from the object's BTF."""
    return enums.object_names(obj_path, enums.CT_EVENTS)


def read(m: Map, names: dict[int, str]) -> dict[str, int]:
    """Every named event's count, summed over CPUs (zeros included)."""
    stride = m.value_stride
    out = {name: 0 for name in names.values()}
    for key, value in m.items():
        idx = int.from_bytes(key, "little")
        if idx in names:
            out[names[idx]] = sum(int.from_bytes(value[c * stride:c * stride + 8], "little")
                                  for c in range(m.ncpus))
    return out
