"""Programs services into the datapath's pinned maps, atomically for the datapath.

A service change is written in this order, so that a packet sees either the old
service or the new one, never a mix:

1. backends (new ones get an id; the entry of an existing one is updated in place);
2. the backend slots of the bank slot 0 does *not* use, and that bank's Maglev table
   (a fresh inner map of M entries, filled with one batch update, then put into the
   outer map under ``(rev_nat, bank)``);
3. the reverse-NAT entry;
4. slot 0, in one map update: count, bank, Maglev size, flags. This is the commit.

Then the old bank's slots and Maglev table are deleted. A failure before the commit
removes what steps 1-2 added and leaves the service as it was.

Both families take this one path: a service's maps, keys and values come from its
:class:`~tuplet.lb.families.Family` (IPv4 or IPv6, by its address).

Backends no longer in any service are kept while a conntrack entry of a service flow
still names them ("draining"), so established connections to a removed backend keep
working; each later change deletes those no flow uses any more.

Which services exist, and which backend ids and reverse-NAT indices they use, is kept in
a registry next to the node state (``/run/tuplet/<pin root>.services.json``), changed
under a lock. The bank and index actually in use are read back from slot 0, so a
registry that is behind (the process died between commit and save) is harmless.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
from typing import Any, Collection, Iterator

import numpy as np
import structlog

from tuplet.bpf.maps import Map
from tuplet.core import crashpoints
from tuplet.core.errors import ConfigError, NotFoundError, TupletError
from tuplet.datapath import paths
from tuplet.datapath.abi import (
    EXTERNAL_MAP,
    LB_BACKEND_F_REMOTE,
    LB_BANK_STRIDE,
    LB_MAPS,
    LB_SVC_F_AFFINITY,
    LB_SVC_F_EXTERNAL,
    LB_SVC_F_LOADBALANCER,
    LB_SVC_F_NODEPORT,
    MAGLEV_MAP,
)
from tuplet.datapath.layouts import Lb4MaglevKey, Lb4Service
from tuplet.datapath.paths import is_pinned, open_pinned
from tuplet.lb import families, maglev, maglev_map, recovery
from tuplet.lb.draining import backend_ids_in_use
from tuplet.lb.families import FAMILIES, Family
from tuplet.lb.model import Backend, BackendShare, Service, ServiceType, ServiceView
from tuplet.lb.registry import Registry, backend_key

log = structlog.get_logger("tuplet.lb")


MAX_REV_NAT = 0xFFFF
MAX_BACKEND_ID = 0xFFFFFFFF

TYPE_FLAGS = {ServiceType.CLUSTER_IP: 0, ServiceType.NODE_PORT: LB_SVC_F_EXTERNAL | LB_SVC_F_NODEPORT,
              ServiceType.LOAD_BALANCER: LB_SVC_F_EXTERNAL | LB_SVC_F_LOADBALANCER}


class ServiceTable:
    """The services of the datapath under one pin root. Use as a context manager: it holds
    the registry lock and the maps while open."""

    def __init__(self, pin_root: str, *, local_addrs: set[str] | None = None,
                 default_maglev_size: int | None = None) -> None:
        self.pin_root = pin_root
        self._default_m = default_maglev_size
        self.path = paths.services_path(pin_root)
        self._lock_file: Any = None
        self.maps: dict[str, Map] = {}
        self._given_local_addrs = local_addrs
        self.local_addrs: set[str] = set(local_addrs or ())
        self.reg = Registry()

    # --- open / close ------------------------------------------------------------------------

    def __enter__(self) -> "ServiceTable":
        for name in (*LB_MAPS, EXTERNAL_MAP):
            path = os.path.join(self.pin_root, name)
            if not os.path.exists(path):
                self.close()
                raise NotFoundError(f"pinned map {path}", "open",
                                    detail="no services datapath under this pin root (run `tuplet apply` first)")
            self.maps[name] = Map.from_pin(path)
        if self._given_local_addrs is None:
            self.local_addrs = local_endpoints(self.pin_root)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_suffix(".lock"), "w")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            self.reg = Registry.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            self.reg = Registry()
        except (ValueError, KeyError, TypeError) as e:
            self.close()
            raise TupletError(str(self.path), "read", detail=f"service registry is damaged: {e}") from None
        if self._default_m is not None:
            self.reg.default_maglev_size = self._default_m
        recovery.recover(self)   # what a writer killed mid-write left
        return self

    @property
    def default_m(self) -> int:
        """Maglev table size of services that do not set one."""
        return self.reg.default_maglev_size

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        if self._lock_file is not None:
            recovery.mark_clean(self.path)   # every write finished or was undone
            self._lock_file.close()   # releases the lock
            self._lock_file = None

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.reg.to_json(), indent=2), encoding="utf-8")
        os.replace(tmp, self.path)

    # --- reading --------------------------------------------------------------------------------

    def _slot0(self, s: Service) -> Lb4Service | None:
        fam = families.of(s.address)
        raw = self.maps[fam.services_map].lookup(fam.key(s.address, s.port, s.proto))
        return Lb4Service.from_buffer_copy(raw) if raw is not None else None

    def get(self, name: str) -> Service:
        try:
            return self.reg.services[name]
        except KeyError:
            raise NotFoundError(f"service {name!r}", "find", detail="no such service") from None

    def names(self) -> list[str]:
        return sorted(self.reg.services)

    def view(self, name: str) -> ServiceView:
        s = self.get(name)
        live = self._slot0(s)
        rev_nat = live.rev_nat_index if live else self.reg.rev_nat[name]
        bank = live.bank if live else 0
        m = live.maglev_size if live else 0
        table = maglev_map.read_table(self.maps[MAGLEV_MAP], rev_nat, bank) if live else np.zeros(0, np.uint32)
        ids, counts = np.unique(table, return_counts=True)
        owned = dict(zip(ids.tolist(), counts.tolist()))
        shares = []
        for b in s.backends:
            bid = self.reg.backends.get(backend_key(b, s.protocol), 0)
            shares.append(BackendShare(backend=b, id=bid, slots=int(owned.get(bid, 0)),
                                       remote=self._remote(b)))
        return ServiceView(service=s, rev_nat=rev_nat, bank=bank, maglev_size=m, live=live is not None,
                           backends=shares)

    def draining(self) -> dict[str, int]:
        """Backends kept only for established flows (backend_key -> id)."""
        ref = self.reg.referenced_backends()
        return {k: v for k, v in self.reg.backends.items() if k not in ref}

    # --- writing --------------------------------------------------------------------------------

    def _remote(self, b: Backend) -> bool:
        return b.address not in self.local_addrs

    def _backend_value(self, b: Backend, proto: int) -> ctypes.Structure:
        return families.of(b.address).backend(b.address, b.port, proto,
                                               LB_BACKEND_F_REMOTE if self._remote(b) else 0, b.node)

    def _new_backend_id(self, taken: set[int]) -> int:
        i = 1
        while i in taken:
            i += 1
        if i > MAX_BACKEND_ID:
            raise TupletError("backend ids", "allocate", detail="no free backend id")
        return i

    def _new_rev_nat(self) -> int:
        taken = set(self.reg.rev_nat.values())
        for i in range(1, MAX_REV_NAT + 1):
            if i not in taken:
                return i
        raise TupletError("reverse-NAT indices", "allocate", detail=f"all {MAX_REV_NAT} are in use")

    def _check_frontend(self, s: Service, replacing: Collection[str] = (), hint: str = "") -> None:
        """Refuse s when another service (not s itself, nor one of ``replacing``) has its
        address, port and protocol."""
        for other in self.reg.services.values():
            if other.name != s.name and other.name not in replacing and other.frontend == s.frontend:
                raise ConfigError(f"services.{s.name}", f"{s.describe_frontend()} is already service "
                                                       f"{other.name!r}{hint}")

    def upsert(self, s: Service) -> ServiceView:
        """Add service s, or change it to s (same name). Its address, port and protocol
        cannot change in place (delete it and add it again)."""
        old = self.reg.services.get(s.name)
        if old is not None and old.frontend != s.frontend:
            raise ConfigError(f"services.{s.name}", f"is {old.describe_frontend()}; its address, port and "
                                                   "protocol cannot change (delete and add it instead)")
        self._check_frontend(s)
        m = s.maglev_size or self.default_m
        active = [b for b in s.backends if b.weight > 0]
        if len(active) > m:
            raise ConfigError(f"services.{s.name}.maglev_size", f"{m} is smaller than the number of backends")

        fam = families.of(s.address)
        svc_map, be_map = self.maps[fam.services_map], self.maps[fam.backends_map]
        live = self._slot0(s)
        rev_nat = live.rev_nat_index if live else self.reg.rev_nat.get(s.name) or self._new_rev_nat()
        old_bank = live.bank if live else 1
        bank = 1 - old_bank
        base = LB_BANK_STRIDE if bank else 0

        added_ids: dict[str, int] = {}
        written_slots: list[ctypes.Structure] = []
        maglev_written = False
        recovery.mark_dirty(self.path)
        try:
            # 1. Backends.
            ids: dict[str, int] = {}
            taken = set(self.reg.backends.values())
            for b in s.backends:
                k = backend_key(b, s.protocol)
                bid = self.reg.backends.get(k)
                if bid is None:
                    bid = self._new_backend_id(taken)
                    taken.add(bid)
                    added_ids[k] = bid
                be_map.update(bid, self._backend_value(b, s.proto))
                ids[k] = bid
            # 2. The unused bank: clear leftovers, write slots and the Maglev table.
            self._clear_bank(s, bank, rev_nat)
            for i, b in enumerate(active, start=1):
                key = fam.key(s.address, s.port, s.proto, base + i)
                svc_map.update(key, Lb4Service(backend_id=ids[backend_key(b, s.protocol)]))
                written_slots.append(key)
            if active:
                idx = maglev.build_index_table([b.endpoint for b in active], m, [b.weight for b in active])
                table = np.asarray([ids[backend_key(b, s.protocol)] for b in active], np.uint32)[idx]
                self._put_maglev(rev_nat, bank, table)
                maglev_written = True
            # 3. Reverse NAT.
            self.maps[fam.rev_nat_map].update(rev_nat.to_bytes(2, "little"), fam.rev_nat(s.address, s.port))
            crashpoints.point("lb.bank-written")
            # 4. Commit.
            flags = TYPE_FLAGS[s.type] | (LB_SVC_F_AFFINITY if s.affinity_timeout else 0)
            if flags & LB_SVC_F_EXTERNAL:   # before the first packet can take it: its replies are probed
                self.maps[EXTERNAL_MAP].update(0, (1).to_bytes(4, "little"))
            svc_map.update(fam.key(s.address, s.port, s.proto),
                           Lb4Service(backend_id=0, affinity_timeout=s.affinity_timeout,
                                      maglev_size=m if active else 0, count=len(active),
                                      rev_nat_index=rev_nat, flags=flags, bank=bank))
        except BaseException:
            with contextlib.suppress(TupletError, OSError):
                for written in written_slots:
                    svc_map.delete(written)
                if maglev_written:
                    self.maps[MAGLEV_MAP].delete(Lb4MaglevKey(rev_nat, bank, 0))
                for bid in added_ids.values():
                    be_map.delete(bid)
                if live is None:
                    self.maps[fam.rev_nat_map].delete(rev_nat.to_bytes(2, "little"))
            raise
        crashpoints.point("lb.committed")
        self.reg.services[s.name] = s
        self.reg.rev_nat[s.name] = rev_nat
        self.reg.backends.update(added_ids)
        self._save()

        # After the commit: the old bank goes, then what nothing refers to any more.
        self._clear_bank(s, old_bank, rev_nat)
        kept = {ids[backend_key(b, s.protocol)] for b in s.backends}
        self._forget_affinity(fam, rev_nat, keep=kept)
        self._prune_backends()
        log.info("service programmed", service=s.name, frontend=s.describe_frontend(), type=s.type.value,
                 backends=len(s.backends), active=len(active), maglev_size=m, rev_nat=rev_nat, bank=bank,
                 created=old is None)
        return self.view(s.name)

    def delete(self, name: str) -> None:
        s = self.get(name)
        live = self._slot0(s)
        rev_nat = live.rev_nat_index if live else self.reg.rev_nat[name]
        fam = families.of(s.address)
        recovery.mark_dirty(self.path)
        self.maps[fam.services_map].delete(fam.key(s.address, s.port, s.proto))   # the commit
        del self.reg.services[name]
        del self.reg.rev_nat[name]
        self._save()
        for bank in (0, 1):
            self._clear_bank(s, bank, rev_nat)
        self.maps[fam.rev_nat_map].delete(rev_nat.to_bytes(2, "little"))
        self._forget_affinity(fam, rev_nat, keep=set())
        self._prune_backends()
        log.info("service deleted", service=name, frontend=s.describe_frontend())

    def sync(self, services: tuple[Service, ...]) -> dict[str, list[str]]:
        """Make the configuration's services (source "config") exactly ``services``;
        services added with `tuplet svc` are left alone unless the configuration now
        names them. Also refreshes every backend's local/remote flag. Returns what changed."""
        wanted = {s.name: s for s in services}
        for s in services:
            self._check_frontend(s, wanted, " (added with `tuplet svc`)")
        done: dict[str, list[str]] = {"added": [], "updated": [], "deleted": [], "unchanged": []}
        for name in [n for n, s in self.reg.services.items() if s.source == "config" and n not in wanted]:
            self.delete(name)
            done["deleted"].append(name)
        for s in services:
            old = self.reg.services.get(s.name)
            if old is not None and old.frontend != s.frontend:
                self.delete(s.name)
                old = None
            live = self._slot0(s) if old is not None else None
            if old == s and old.source == s.source and live is not None \
                    and (live.maglev_size == (s.maglev_size or self.default_m) or live.count == 0) \
                    and self._flags_current(s):
                done["unchanged"].append(s.name)
                continue
            self.upsert(s)
            done["added" if old is None else "updated"].append(s.name)
        return done

    def _flags_current(self, s: Service) -> bool:
        be_map = self.maps[families.of(s.address).backends_map]
        for b in s.backends:
            bid = self.reg.backends.get(backend_key(b, s.protocol))
            raw = be_map.lookup(bid) if bid else None
            if raw is None or raw != bytes(self._backend_value(b, s.proto)):
                return False
        return True

    # --- helpers ----------------------------------------------------------------------------------

    def _put_maglev(self, rev_nat: int, bank: int, table: np.ndarray) -> None:
        maglev_map.put_table(self.maps[MAGLEV_MAP], self.maps[families.V4.backends_map], rev_nat, bank, table)

    def _clear_bank(self, s: Service, bank: int, rev_nat: int) -> None:
        """Delete every backend slot of one bank of s, and that bank's Maglev table."""
        fam = families.of(s.address)
        svc_map = self.maps[fam.services_map]
        lo, hi = (LB_BANK_STRIDE + 1, 2 * LB_BANK_STRIDE) if bank else (1, LB_BANK_STRIDE)
        front = bytes(fam.key(s.address, s.port, s.proto))
        mine = []
        for raw in svc_map.keys():
            k, slot = fam.frontend_of(raw)
            if k == front and lo <= slot < hi:
                mine.append(raw)
        if mine:
            svc_map.delete_batch(b"".join(mine), len(mine))
        self.maps[MAGLEV_MAP].delete(Lb4MaglevKey(rev_nat, bank, 0))

    def _forget_affinity(self, fam: Family, rev_nat: int, keep: set[int]) -> None:
        aff = self.maps[fam.affinity_map]
        stale = []
        for k, v in aff.items():
            key = fam.affinity_key_cls.from_buffer_copy(k)
            if key.rev_nat_index == rev_nat and int.from_bytes(v[4:8], "little") not in keep:
                stale.append(k)
        if stale:
            aff.delete_batch(b"".join(stale), len(stale))

    def _prune_backends(self) -> list[str]:
        """Delete backends no service has and no service flow uses."""
        orphans = self.draining()
        if not orphans:
            return []
        used = backend_ids_in_use(self.pin_root)
        gone = [k for k, bid in orphans.items() if bid not in used]
        for k in gone:
            self.maps[families.of_backend_key(k).backends_map].delete(self.reg.backends.pop(k))
        if gone:
            self._save()
            log.info("backends removed", backends=gone, draining=len(orphans) - len(gone))
        return gone


def local_endpoints(pin_root: str) -> set[str]:
    """The node's pod addresses: the keys of the pinned endpoint maps, both families (a
    backend at one of them is local; any other is remote)."""
    out: set[str] = set()
    for fam in FAMILIES:
        if is_pinned(pin_root, fam.ep_map):
            with open_pinned(pin_root, fam.ep_map) as ep:
                out.update(fam.unpack(key) for key in ep.keys())
    return out


def services_of(table: ServiceTable) -> Iterator[ServiceView]:
    for name in table.names():
        yield table.view(name)


def sync_config(pin_root: str, services: tuple[Service, ...], local_addrs: set[str],
                default_maglev_size: int) -> dict[str, list[str]]:
    """Program the configuration's services (used by `tuplet apply`)."""
    with ServiceTable(pin_root, local_addrs=local_addrs, default_maglev_size=default_maglev_size) as t:
        return t.sync(services)
