"""Socket LB on the node: the cgroup programs of ``bpf_sock.o`` attached to the configured
cgroup v2 directory (``[lb] socket_lb_cgroup``, by default the cgroup v2 root), so a
connect() or sendto() to a ClusterIP from a process in that cgroup goes straight to a
backend (README "Services"). The links are pinned under ``<pin root>/links/cgroup-*``;
turning ``[lb] socket_lb`` off or ``teardown`` detaches them.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import structlog

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
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.bpf.programs import Program
from tuplet.core import crashpoints
from tuplet.core.errors import NotSupportedError, TupletError
from tuplet.datapath import clock
from tuplet.datapath.abi import OBJ_SOCK, SOCK_HOOKS
from tuplet.datapath.paths import object_dir

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
