"""The datapath's verdict counters, with reason names read from the object's BTF."""
from __future__ import annotations

from dataclasses import dataclass

from tuplet.bpf.maps import Map
from tuplet.datapath import enums
from tuplet.datapath.abi import TPL_REASON_SLOTS
from tuplet.datapath.layouts import MetricsValue


@dataclass(frozen=True)
class Counter:
    reason: str
    direction: str
    packets: int
    bytes: int

    @property
    def dropped(self) -> bool:
        return self.reason.startswith("DROP_")


def reason_names(obj_path: str) -> dict[int, str]:
    """Reason values to names (``PASS_CT_NEW``, ``DROP_CT_INSERT_FAILED``...) from BTF."""
    return enums.object_names(obj_path, enums.REASONS)


def direction_names(obj_path: str) -> dict[int, str]:
    """Metric directions to names (``egress``, ``ingress``, ``netdev_ingress``...) from BTF."""
    return enums.object_names(obj_path, enums.DIRECTIONS)


def read(m: Map, names: dict[int, str], directions: dict[int, str] | None = None) -> list[Counter]:
    """Non-zero counters, summed over CPUs. ``directions`` defaults to the pod programs' two."""
    directions = directions or {0: "egress", 1: "ingress"}
    out = []
    stride = m.value_stride
    for key, value in m.items():
        idx = int.from_bytes(key, "little")
        packets = bytes_ = 0
        for cpu in range(m.ncpus):
            v = MetricsValue.from_buffer_copy(value, cpu * stride)
            packets += v.packets
            bytes_ += v.bytes
        if packets:
            d, r = divmod(idx, TPL_REASON_SLOTS)
            out.append(Counter(names.get(r, f"reason_{r}"), directions.get(d, str(d)),
                               packets, bytes_))
    return out
