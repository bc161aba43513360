"""Service writes interrupted by a crash: found and undone when the next writer opens the table.

A ``ServiceTable`` marks the registry dirty (``<registry>.dirty``) before its first map
write and clears the mark when it closes; only a process killed mid-write leaves it. The
registry is saved only after a write committed (slot 0), so it holds the last completed
state. The next writer, holding the lock, then brings the maps back to it:

* service-map keys of services the registry does not have (a new service killed before
  or after its commit, before the save) go, slot 0 and backend slots; so do reverse-NAT
  entries and Maglev tables of indexes no registered service has;
* every registered service is written again from the registry (the bank a killed update
  wrote, or committed, is replaced by the registry's backends);
* backend entries with an id the registry does not know (added by a killed write) go.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import structlog

from tuplet.bpf.maps import Map
from tuplet.datapath.abi import MAGLEV_MAP
from tuplet.datapath.layouts import Lb4MaglevKey
from tuplet.lb import families
from tuplet.lb.families import FAMILIES, Family
from tuplet.lb.model import Service
from tuplet.lb.registry import Registry

log = structlog.get_logger("tuplet.lb")


class Table(Protocol):
    """What recovery needs of a ServiceTable (open, locked)."""
    path: Path
    maps: dict[str, Map]
    reg: Registry

    def upsert(self, s: Service) -> object: ...


def dirty_path(registry: Path) -> Path:
    return registry.with_suffix(".dirty")


def mark_dirty(registry: Path) -> None:
    """Before a map write: a crash from here on is repaired by the next writer."""
    registry.parent.mkdir(parents=True, exist_ok=True)
    dirty_path(registry).touch()


def mark_clean(registry: Path) -> None:
    dirty_path(registry).unlink(missing_ok=True)


def recover(t: Table) -> None:
    """Undo what an interrupted writer left, if one did (see the module docstring)."""
    if not dirty_path(t.path).exists():
        return
    orphans = sum(_drop_orphans(t, fam) for fam in FAMILIES)
    stray_indexes = _drop_stray_indexes(t)
    for s in list(t.reg.services.values()):
        t.upsert(s)
    ids = set(t.reg.backends.values())
    stray = 0
    for fam in FAMILIES:
        for raw in [raw for raw in t.maps[fam.backends_map].keys() if int.from_bytes(raw, "little") not in ids]:
            t.maps[fam.backends_map].delete(raw)
            stray += 1
    log.warning("service writes of a killed process undone", orphan_services=orphans,
                services_rewritten=len(t.reg.services), stray_backends=stray, stray_rev_nat=stray_indexes)


def _drop_orphans(t: Table, fam: Family) -> int:
    """Delete the service-map keys (slot 0 and backend slots) of one family's services the
    registry does not have. Returns how many services there were."""
    svc_map = t.maps[fam.services_map]
    known = {bytes(fam.key(s.address, s.port, s.proto)) for s in t.reg.services.values()
             if families.of(s.address) is fam}
    keys = [(raw, fam.frontend_of(raw)[0]) for raw in svc_map.keys()]
    orphans = {front for _, front in keys if front not in known}
    for raw, front in keys:
        if front in orphans:
            svc_map.delete(raw)
    return len(orphans)


def _drop_stray_indexes(t: Table) -> int:
    """Delete reverse-NAT entries and Maglev tables of indexes no registered service of
    that family has (a new service killed before or after its commit left them).
    Returns how many entries went."""
    gone = 0
    for fam in FAMILIES:
        mine = {t.reg.rev_nat[n] for n, s in t.reg.services.items() if families.of(s.address) is fam}
        rev = t.maps[fam.rev_nat_map]
        for raw in [raw for raw in rev.keys() if int.from_bytes(raw, "little") not in mine]:
            gone += rev.delete(raw)
    known = set(t.reg.rev_nat.values())
    mg = t.maps[MAGLEV_MAP]
    for raw in [raw for raw in mg.keys() if Lb4MaglevKey.from_buffer_copy(raw).rev_nat_index not in known]:
        gone += mg.delete(raw)
    return gone
