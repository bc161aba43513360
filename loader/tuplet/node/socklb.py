"""Socket LB on the node: the cgroup programs of ``bpf_sock.o`` attached to the configured
cgroup v2 directory (``[lb] socket_lb_cgroup``, by default the cgroup v2 root), so a
connect() or sendto() to a ClusterIP from a process in that cgroup goes straight to a
backend (README "Services"). The links are pinned under ``<pin root>/links/cgroup-*``;
turning ``[lb] socket_lb`` off or ``teardown`` detaches them.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from tuplet.bpf.btf import Btf, BtfError, Kind
from tuplet.bpf.iter import IterLink
from tuplet.bpf.links import (
    CgroupHook,
    CgroupLink,
    cgroup_detach,
    cgroup_id,
    cgroup_link_create,
    cgroup_link_pin_path,
    cgroup_link_update,
    pinned_cgroup_link,
)
from tuplet.bpf.maps import Map
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.bpf.programs import Program
from tuplet.core import crashpoints
from tuplet.core.errors import NotSupportedError, TupletError
from tuplet.datapath import clock
from tuplet.datapath.abi import (
    LB_BANK_STRIDE,
    OBJ_SOCK,
    OBJ_SOCK_DESTROY,
    SOCK6_REV_NAT_MAP,
    SOCK_DESTROY_PROGRAM,
    SOCK_DESTROY_TARGETS,
    SOCK_HOOKS,
    SOCK_REV_NAT_MAP,
)
from tuplet.datapath.layouts import (
    Lb4Service,
    Lb4SockRevKey,
    Lb4SockRevVal,
    Lb6SockRevKey,
    Lb6SockRevVal,
    ip6_to_bytes,
)
from tuplet.datapath.paths import is_pinned, object_dir, open_pinned
from tuplet.lb.families import V4, V6, Family
from tuplet.node import netns

log = structlog.get_logger("tuplet.socklb")

MOUNTS = "/proc/self/mounts"


def cgroup2_root(mounts: str = MOUNTS) -> str:
    """Where cgroup v2 is mounted (its root cgroup); NotSupportedError when it is not."""
    try:
        lines = Path(mounts).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise NotSupportedError("socket LB", detail=f"cannot read {mounts}: {e.strerror}") from None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return parts[1].replace("\\040", " ")
    raise NotSupportedError("socket LB", detail="no cgroup v2 file system is mounted; mount one "
                            "(mount -t cgroup2 none /sys/fs/cgroup) or set [lb] socket_lb = false")


def resolve_cgroup(configured: str) -> str:
    """The cgroup to attach to: the configured directory, else the cgroup v2 root."""
    return configured or cgroup2_root()


class Change:
    """Socket LB attached by one apply, undone by :meth:`rollback` until :meth:`commit`.

    Links already on the configured cgroup are updated in place (rollback puts the programs
    they ran back); a link on another cgroup stays until commit, the new cgroup's link waiting
    beside it at a staging pin (both running for a moment is harmless: the second connect4
    sees a backend address, not a ClusterIP). So a failed apply leaves the old cgroup's links
    exactly as they were."""

    def __init__(self, pin_root: str, coll: Collection) -> None:
        self.pin_root = pin_root
        self.coll = coll
        self.staged: list[CgroupHook] = []
        self.updated: list[tuple[CgroupHook, Program]] = []   # (hook, the program it ran before)

    def rollback(self) -> None:
        for hook in self.staged:
            with contextlib.suppress(TupletError, OSError):
                cgroup_detach(cgroup_link_pin_path(self.pin_root, hook, staged=True))
        for hook, prog in self.updated:
            with contextlib.suppress(TupletError, OSError):
                cgroup_link_update(cgroup_link_pin_path(self.pin_root, hook), prog)
        self._close()

    def commit(self) -> None:
        """The apply succeeded: staged links replace the old cgroup's."""
        for hook in self.staged:
            pin = cgroup_link_pin_path(self.pin_root, hook)
            cgroup_detach(pin)
            os.rename(cgroup_link_pin_path(self.pin_root, hook, staged=True), pin)
        self._close()

    def _close(self) -> None:
        for _hook, prog in self.updated:
            prog.close()
        self.coll.close()


def attach(pin_root: str, cgroup: str) -> Change:
    """Load bpf_sock.o (reusing the node's pinned service maps) and attach its programs to
    cgroup, undoably (see :class:`Change`; the caller commits or rolls back). On failure,
    what this call did is undone."""
    discard_staged(pin_root)   # an apply killed before its commit
    spec = ObjectSpec.open(object_dir() / OBJ_SOCK, pin_root=pin_root)
    try:
        clock.apply_test_offset(spec)
        coll = spec.load()
    finally:
        spec.close()
    change = Change(pin_root, coll)
    target = cgroup_id(cgroup)
    try:
        for prog, hook in SOCK_HOOKS:
            pin = cgroup_link_pin_path(pin_root, hook)
            old = pinned_cgroup_link(pin)
            if old.cgroup_id == target:
                change.updated.append((hook, Program.from_id(old.prog_id)))   # held: rollback needs it
                cgroup_link_update(pin, coll.programs[prog])
            else:
                cgroup_link_create(coll.programs[prog], cgroup, hook, cgroup_link_pin_path(pin_root, hook, True))
                change.staged.append(hook)
            crashpoints.point(f"socklb.attached-{hook.value}")
    except BaseException:
        change.rollback()
        raise
    log.info("socket LB attached", cgroup=cgroup, programs=len(SOCK_HOOKS), moved_or_new=len(change.staged))
    return change


def discard_staged(pin_root: str) -> None:
    """Detach links a killed apply left at the staging pins (the old ones are still in place)."""
    for _prog, hook in SOCK_HOOKS:
        cgroup_detach(cgroup_link_pin_path(pin_root, hook, staged=True))


def detach(pin_root: str) -> int:
    """Detach every socket-LB link pinned under pin_root. Returns how many there were."""
    discard_staged(pin_root)
    n = 0
    for _prog, hook in SOCK_HOOKS:
        pin = cgroup_link_pin_path(pin_root, hook)
        if Path(pin).exists():
            cgroup_detach(pin)
            n += 1
    if n:
        log.info("socket LB detached", links=n)
    return n


def links(pin_root: str) -> list[tuple[str, CgroupLink]]:
    """(program, its pinned link) for each socket-LB hook (zeros: not attached)."""
    return [(prog, pinned_cgroup_link(cgroup_link_pin_path(pin_root, hook))) for prog, hook in SOCK_HOOKS]


def attached_cgroup_ids(pin_root: str) -> set[int]:
    """The ids of the cgroups socket-LB links under pin_root are on (empty: off)."""
    return {link.cgroup_id for _prog, link in links(pin_root) if link.cgroup_id}


def describe(pin_root: str, cgroup: str) -> dict[str, Any]:
    """Socket LB as `tuplet status` shows it: configured on (cgroup, as apply recorded it) or
    off, each program's pinned link, and the hooks whose link is missing or on another cgroup."""
    want = 0
    with contextlib.suppress(TupletError):
        want = cgroup_id(cgroup) if cgroup else 0
    found = [{"program": prog, "hook": hook.value, **link._asdict()}
             for (prog, link), (_p, hook) in zip(links(pin_root), SOCK_HOOKS)]
    missing = [str(f["hook"]) for f in found if cgroup and (not f["link_id"] or f["cgroup_id"] != want)]
    return {"configured": bool(cgroup), "cgroup": cgroup, "cgroup_id": want,
            "links": [f for f in found if f["link_id"]], "missing": missing}


# --- connected UDP sockets of removed backends -------------------------------------------------

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"


def can_destroy_sockets() -> bool:
    """True when the kernel has the bpf_sock_destroy kfunc (Linux 6.5+)."""
    try:
        with Btf.from_file(VMLINUX_BTF) as btf:
            btf.find("bpf_sock_destroy", Kind.FUNC)
        return True
    except (BtfError, OSError):
        return False


@dataclass(frozen=True)
class _SockFamily:
    """A family's socket-LB reverse map and its layouts, beside its service maps."""

    lb: Family
    rev_map: str
    key_cls: type[Lb4SockRevKey] | type[Lb6SockRevKey]
    val_cls: type[Lb4SockRevVal] | type[Lb6SockRevVal]

    def address(self, entry: Lb4SockRevKey | Lb6SockRevKey | Lb4SockRevVal | Lb6SockRevVal) -> str:
        """The address of a reverse-map key (the backend) or value (the service)."""
        return self.lb.unpack(bytes(entry)[type(entry).address.offset:])


_SOCK_FAMILIES = (_SockFamily(V4, SOCK_REV_NAT_MAP, Lb4SockRevKey, Lb4SockRevVal),
                  _SockFamily(V6, SOCK6_REV_NAT_MAP, Lb6SockRevKey, Lb6SockRevVal))


class StaleSocket(NamedTuple):
    """A socket socket LB pointed at a backend its service no longer has: its reverse-map key."""

    rev_map: str
    key: Lb4SockRevKey | Lb6SockRevKey
    address: str      # the backend's

    def target(self) -> Lb6SockRevKey:
        """The key sock_destroy.c looks the socket up by: an IPv4 backend IPv4-mapped."""
        addr = self.address if ":" in self.address else f"::ffff:{self.address}"
        return Lb6SockRevKey(self.key.cookie, ip6_to_bytes(addr), self.key.port, 0, 0)


def stale_udp_sockets(pin_root: str) -> list[StaleSocket]:
    """The sockets (reverse-map keys: socket, backend) socket LB pointed at a backend that their
    service no longer has, of both families: a UDP service without that backend in its current
    bank (removed, or weight 0), or a service that is gone. A TCP service's sockets are never
    stale (a connection to a draining backend keeps working). Read from the pinned maps."""
    stale: list[StaleSocket] = []
    for fam in _SOCK_FAMILIES:
        if not is_pinned(pin_root, fam.rev_map):
            continue
        with open_pinned(pin_root, fam.rev_map) as rev, open_pinned(pin_root, fam.lb.services_map) as svc, \
                open_pinned(pin_root, fam.lb.backends_map) as be:
            live: dict[tuple[str, int, int], set[tuple[str, int]] | None] = {}
            for k, v in rev.items():
                key, val = fam.key_cls.from_buffer_copy(k), fam.val_cls.from_buffer_copy(v)
                frontend = (fam.address(val), socket.ntohs(val.port), val.rev_nat_index)
                if frontend not in live:
                    live[frontend] = _udp_backends(fam.lb, svc, be, *frontend)
                backends, address = live[frontend], fam.address(key)
                if backends is not None and (address, key.port) not in backends:
                    stale.append(StaleSocket(fam.rev_map, key, address))
    return stale


def _udp_backends(fam: Family, svc: Map, be: Map, address: str, port: int,
                  rev_nat_index: int) -> set[tuple[str, int]] | None:
    """(address, port as stored) of the backends in the current bank of the UDP service at
    address:port; None for a TCP service's; empty when the service is gone (or another one has
    its address)."""
    for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        raw = svc.lookup(fam.key(address, port, proto))
        if raw is not None and Lb4Service.from_buffer_copy(raw).rev_nat_index == rev_nat_index:
            break
    else:
        return set()
    if proto == socket.IPPROTO_TCP:
        return None
    s = Lb4Service.from_buffer_copy(raw)
    out = set()
    base = LB_BANK_STRIDE if s.bank else 0
    for slot in range(1, s.count + 1):
        raw = svc.lookup(fam.key(address, port, proto, base + slot))
        b = be.lookup(Lb4Service.from_buffer_copy(raw).backend_id) if raw is not None else None
        if b is not None:
            out.add((fam.unpack(b), fam.backend_cls.from_buffer_copy(b).port))
    return out


def destroy_stale_udp(pin_root: str) -> int:
    """Destroy the connected UDP sockets, in every network namespace, that socket LB pointed at a
    backend their service no longer has (:func:`stale_udp_sockets`, both families): their next
    recv()/send() fails with ECONNABORTED and a new socket gets a live backend. Without
    bpf_sock_destroy (before Linux 6.5) nothing is destroyed: such a socket keeps sending to the
    old backend until the application reconnects. Returns how many were destroyed."""
    stale = stale_udp_sockets(pin_root)
    if not stale:
        return 0
    if not can_destroy_sockets():
        log.warning("connected UDP sockets of removed backends not destroyed: the kernel has no "
                    "bpf_sock_destroy (Linux 6.5+); they keep the old backend until they reconnect",
                    sockets=len(stale))
        return 0
    spec = ObjectSpec.open(object_dir() / OBJ_SOCK_DESTROY, pin_root=pin_root)
    try:
        coll = spec.load()
    finally:
        spec.close()
    destroyed = 0
    size = ctypes.sizeof(Lb6SockRevKey)   # what the iterator writes per destroyed socket
    try:
        targets = coll.maps[SOCK_DESTROY_TARGETS]
        for s in stale:
            targets.update(s.target(), b"\x01")
        with IterLink(coll.programs[SOCK_DESTROY_PROGRAM]) as it:
            for ns in netns.all_namespaces():
                try:
                    with netns.enter_file(ns):
                        destroyed += sum(len(chunk) // size for chunk in it.slices(size * 256))
                except netns.NetnsError:
                    continue   # its process went, and the namespace with it
    finally:
        coll.close()
    for fam in _SOCK_FAMILIES:   # destroyed, or not a connected socket of any namespace any more
        keys = [s.key for s in stale if s.rev_map == fam.rev_map]
        if keys:
            with open_pinned(pin_root, fam.rev_map) as rev:
                for key in keys:
                    rev.delete(key)
    log.info("connected UDP sockets of removed backends destroyed", sockets=destroyed, stale=len(stale))
    return destroyed


def after_service_change(pin_root: str) -> None:
    """After services changed (apply, `tuplet svc update/delete`): destroy the connected UDP
    sockets of removed backends. The change is committed already, so a failure here is logged,
    not raised; the next change tries again."""
    try:
        destroy_stale_udp(pin_root)
    except (TupletError, OSError) as e:
        log.warning("connected UDP sockets of removed backends not destroyed", error=str(e))
