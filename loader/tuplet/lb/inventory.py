"""What the datapath's service maps hold, per address family, read without the writer's
lock (for the agent's metrics at scrape time).

Both families' services and backends maps are walked in bounded batches (numpy over
each batch; no per-entry Python for the slots), so a scrape costs O(entries) with at
most :data:`CHUNK` entries per syscall. Service names come from the service registry
(its JSON read as it is, never locked or repaired); a service the registry does not know is named by its
reverse-NAT index (``rev-nat-N``).

* a service is counted by type from its slot 0 (flags);
* a backend is ``active`` while a slot of its service's live bank names it, ``draining``
  otherwise (weight 0, or removed and kept for established flows), and ``local`` or
  ``remote`` by its datapath flag.
"""
from __future__ import annotations

import json
import socket
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tuplet.datapath import paths
from tuplet.datapath.abi import LB_BACKEND_F_REMOTE, LB_BANK_STRIDE
from tuplet.datapath.cttables import Family as CtFamily
from tuplet.datapath.layouts import Lb4Service
from tuplet.datapath.paths import is_pinned, open_pinned
from tuplet.lb.families import FAMILIES, Family
from tuplet.lb.model import ServiceType, host_port
from tuplet.lb.registry import REGISTRY_VERSION
from tuplet.lb.writer import TYPE_FLAGS

CHUNK = 2048
FAMILY_NAMES = {4: CtFamily.IPV4.value, 6: CtFamily.IPV6.value}   # the conntrack metrics' family label
TYPES = tuple(t.value for t in ServiceType)
STATES = ("active", "draining")
LOCATIONS = ("local", "remote")
_SERVICE = np.dtype(Lb4Service)
_PROTOCOLS = {6: "tcp", 17: "udp"}


@dataclass(frozen=True)
class ServiceRow:
    """One service as its slot 0 has it (labels of the per-service metrics)."""

    name: str
    family: str               # ipv4 | ipv6
    address: str              # ADDR:PORT, [ADDR]:PORT for IPv6
    protocol: str
    type: str
    active: int               # backends new flows can get (the live bank's slots)
    draining: int             # the service's backends with weight 0 (registry)
    maglev_size: int


@dataclass
class Inventory:
    services: list[ServiceRow] = field(default_factory=list)
    by_type: Counter[tuple[str, str]] = field(default_factory=Counter)             # (family, type)
    backends: Counter[tuple[str, str, str]] = field(default_factory=Counter)       # (family, state, location)


def _type_of(flags: int) -> str:
    for t, f in sorted(TYPE_FLAGS.items(), key=lambda kv: -kv[1]):
        if flags & f == f:
            return t.value
    return ServiceType.CLUSTER_IP.value


def _registry(pin_root: str) -> dict[int, tuple[str, int]]:
    """rev-NAT index -> (service name, backends at weight 0), from the registry file as it
    is (no lock, no repair; the JSON alone, not the checked model: this runs per scrape)."""
    try:
        d = json.loads(paths.services_path(pin_root).read_text(encoding="utf-8"))
        if d.get("version") != REGISTRY_VERSION:
            return {}
        return {int(sd["rev_nat"]): (name, sum(1 for b in sd.get("backends", ()) if b.get("weight", 1) == 0))
                for name, sd in d.get("services", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def read(pin_root: str) -> Inventory:
    """Both families' services and backends under ``pin_root`` (a family whose maps are
    not pinned is left out)."""
    names = _registry(pin_root)
    inv = Inventory()
    for fam in FAMILIES:
        if is_pinned(pin_root, fam.services_map) and is_pinned(pin_root, fam.backends_map):
            _family(pin_root, fam, names, inv)
    return inv


def _family(pin_root: str, fam: Family, names: dict[int, tuple[str, int]], inv: Inventory) -> None:
    label = FAMILY_NAMES[fam.version]
    key_dt = np.dtype(fam.key_cls)
    # A slot is live when its bank is the one its service's slot 0 names: compare "markers",
    # the key with backend_slot replaced by a bank number, as fixed-width byte strings.
    as_bytes = np.dtype(f"S{key_dt.itemsize}")
    fronts: list[tuple[bytes, np.void]] = []              # (raw slot-0 key, slot 0)
    live, markers, ids = [], [], []
    with open_pinned(pin_root, fam.services_map) as sm:
        for kraw, vraw, n in sm.batches(CHUNK):
            keys = np.frombuffer(kraw, key_dt, count=n)
            vals = np.frombuffer(vraw, _SERVICE, count=n)
            zero = keys["backend_slot"] == 0
            fronts.extend((k.tobytes(), v) for k, v in zip(keys[zero], vals[zero]))
            mark = keys.copy()
            mark["backend_slot"] = np.where(zero, vals["bank"], keys["backend_slot"] >= LB_BANK_STRIDE)
            live.append(mark[zero].view(as_bytes))
            markers.append(mark[~zero].view(as_bytes))
            ids.append(vals["backend_id"][~zero])
    in_live = np.isin(np.concatenate(markers or [np.zeros(0, as_bytes)]),
                      np.concatenate(live or [np.zeros(0, as_bytes)]))
    active = np.unique(np.concatenate(ids or [np.zeros(0, np.uint32)])[in_live]).astype(np.uint32)
    for raw, v in fronts:
        k = fam.key_cls.from_buffer_copy(raw)
        rev_nat, typ = int(v["rev_nat_index"]), _type_of(int(v["flags"]))
        name, draining = names.get(rev_nat, (f"rev-nat-{rev_nat}", 0))
        inv.by_type[(label, typ)] += 1
        inv.services.append(ServiceRow(
            name=name, family=label, address=host_port(fam.unpack(raw), socket.ntohs(k.dport)),
            protocol=_PROTOCOLS.get(int(k.proto), str(int(k.proto))), type=typ, active=int(v["count"]),
            draining=draining, maglev_size=int(v["maglev_size"])))
    with open_pinned(pin_root, fam.backends_map) as bm:
        flags_at = fam.backend_cls.flags.offset
        for kraw, vraw, n in bm.batches(CHUNK):
            bids = np.frombuffer(kraw, np.uint32, count=n)
            rows = np.frombuffer(vraw, np.uint8, count=n * bm.value_size).reshape(n, bm.value_size)
            remote = (rows[:, flags_at] & LB_BACKEND_F_REMOTE) != 0
            used = np.isin(bids, active)
            for state, s_mask in (("active", used), ("draining", ~used)):
                for loc, l_mask in (("local", ~remote), ("remote", remote)):
                    inv.backends[(label, state, loc)] += int((s_mask & l_mask).sum())
