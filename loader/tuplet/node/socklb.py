"""Socket LB on the node: the cgroup programs of ``bpf_sock.o`` attached to the configured
cgroup v2 directory (``[lb] socket_lb_cgroup``, by default the cgroup v2 root), so a
connect() or sendto() to a ClusterIP from a process in that cgroup goes straight to a
backend (README "Services"). The links are pinned under ``<pin root>/links/cgroup-*``;
turning ``[lb] socket_lb`` off or ``teardown`` detaches them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import structlog

from tuplet.bpf.links import cgroup_attach, cgroup_detach, cgroup_link_pin_path, pinned_cgroup_link
from tuplet.bpf.objects import Collection, ObjectSpec
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


def attach(pin_root: str, cgroup: str) -> tuple[Collection, list[str]]:
    """Load bpf_sock.o (reusing the node's pinned service maps) and attach its programs to
    cgroup. Returns the loaded collection (the caller closes it) and the pins of links this
    call created (links pinned already were updated in place); on failure, those are
    detached again."""
    spec = ObjectSpec.open(object_dir() / OBJ_SOCK, pin_root=pin_root)
    try:
        clock.apply_test_offset(spec)
        coll = spec.load()
    finally:
        spec.close()
    made: list[str] = []
    try:
        for prog, hook in SOCK_HOOKS:
            pin = cgroup_link_pin_path(pin_root, hook)
            existed = pinned_cgroup_link(pin)[0] != 0
            cgroup_attach(coll.programs[prog], cgroup, hook, pin_root)
            if not existed:
                made.append(pin)
    except BaseException:
        for pin in made:
            with contextlib.suppress(TupletError, OSError):
                cgroup_detach(pin)
        coll.close()
        raise
    log.info("socket LB attached", cgroup=cgroup, programs=len(SOCK_HOOKS), new_links=len(made))
    return coll, made


def detach(pin_root: str) -> int:
    """Detach every socket-LB link pinned under pin_root. Returns how many there were."""
    n = 0
    for _prog, hook in SOCK_HOOKS:
        pin = cgroup_link_pin_path(pin_root, hook)
        if Path(pin).exists():
            cgroup_detach(pin)
            n += 1
    if n:
        log.info("socket LB detached", links=n)
    return n


def attached_cgroup_ids(pin_root: str) -> set[int]:
    """The ids of the cgroups socket-LB links under pin_root are on (empty: off)."""
    return {cg for _p, hook in SOCK_HOOKS
            for _prog_id, cg in [pinned_cgroup_link(cgroup_link_pin_path(pin_root, hook))] if cg}
