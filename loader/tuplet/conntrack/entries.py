"""Conntrack and NAT entries as numpy arrays: dtypes from the BTF the maps were created
with, where expiry and NAT ownership live, and which NAT entry a CT entry owns (the
numpy form of bpf/lib/nat_map.h's nat_key_for_ct, either family). Used
by GC's batch method, the flushes and the live resize."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tuplet.bpf.btf import Btf
from tuplet.bpf.btf_layout import numpy_dtype, struct_layout
from tuplet.bpf.maps import Map
from tuplet.core.errors import TupletError
from tuplet.datapath.abi import TUPLE_F_OUT


def expired(lifetimes: np.ndarray, now: int) -> np.ndarray:
    """Which lifetimes are before ``now`` on the u32 clock, across its wrap: the signed
    32-bit difference ``now - lifetime`` is positive (bpf/lib/ct_gc.h's gc_expired; never a
    plain ``<`` on the raw values, which near the wrap calls fresh entries expired)."""
    ahead = (np.uint32(now % (1 << 32)) - lifetimes.astype(np.uint32, copy=False)).view(np.int32)
    out: np.ndarray = ahead > 0
    return out


def value_dtype(m: Map, btf: Btf | None = None) -> np.dtype:
    """numpy dtype of a CT map's values, from the BTF the map was created with."""
    if btf is None:
        with m.btf() as own:
            return value_dtype(m, own)
    dt = numpy_dtype(btf, m.info.btf_value_type_id)
    if dt.itemsize != m.value_size or "lifetime" not in (dt.names or ()):
        raise TupletError(m.what, "gc", detail=f"value layout from BTF ({dt.itemsize} bytes) "
                          f"does not match the map ({m.value_size} bytes) or lacks a lifetime")
    return dt


@dataclass(frozen=True)
class EntryLayout:
    """Where expiry and NAT ownership live in a CT map's key and value."""

    key: np.dtype
    value: np.dtype
    owner_bits: str      # storage field of the dsr_internal/node_port bitfields
    owner_mask: int

    @property
    def lifetime_offset(self) -> int:
        """Where the lifetime (u32 seconds) is in a value."""
        fields = self.value.fields
        if fields is None or "lifetime" not in fields:
            raise TupletError("CT value layout", "read", detail="no lifetime field")
        return int(fields["lifetime"][1])

    @classmethod
    def of(cls, m: Map) -> "EntryLayout":
        with m.btf() as btf:
            value = value_dtype(m, btf)
            key = numpy_dtype(btf, m.info.btf_key_type_id)
            bits = {b.name: b for b in struct_layout(btf, m.info.btf_value_type_id).bitfields}
        need = {"daddr", "saddr", "dport", "sport", "nexthdr", "flags"}
        if key.itemsize != m.key_size or not need <= set(key.names or ()):
            raise TupletError(m.what, "gc", detail="key layout from BTF is not a conntrack tuple")
        owners = [bits[n] for n in ("dsr_internal", "node_port") if n in bits]
        if len(owners) != 2 or owners[0].storage != owners[1].storage:
            raise TupletError(m.what, "gc", detail="value layout lacks the dsr_internal/node_port flags")
        mask = sum(((1 << b.bit_size) - 1) << b.shift for b in owners)
        return cls(key, value, owners[0].storage, mask)


def nat_keys_for(keys: np.ndarray, values: np.ndarray, layout: EntryLayout) -> np.ndarray:
    """NAT keys owned by these CT entries (as bpf/lib/nat_map.h's nat{4,6}_key_for_ct: the
    key layout, IPv4 or IPv6, is the CT table's)."""
    own = (keys["flags"] == TUPLE_F_OUT) & ((values[layout.owner_bits] & layout.owner_mask) != 0)
    k = keys[own]
    nat = np.zeros(len(k), layout.key)
    nat["saddr"], nat["sport"] = k["saddr"], k["dport"]     # the backend's reply to the original source
    nat["daddr"], nat["dport"] = k["daddr"], k["sport"]
    nat["nexthdr"], nat["flags"] = k["nexthdr"], TUPLE_F_OUT
    return nat


def nat_list(nat: Map | Sequence[Map] | None) -> list[Map]:
    """The NAT maps a collector or flusher was given: one, several, or none."""
    if nat is None:
        return []
    return [nat] if isinstance(nat, Map) else list(nat)
