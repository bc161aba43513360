"""Attaching programs: to network devices (TCX links, legacy TC as fallback) and to
cgroups (cgroup links, for socket LB).

TCX (Linux 6.6+) attaches through ``bpf_link_create`` with the TCX attach types;
the link is pinned so the attachment outlives the process, and a newer program
replaces the old one atomically with ``bpf_link_update``. On kernels without TCX
the same program goes into a clsact qdisc as a direct-action cls_bpf filter
(libbpf's tc API), replaced atomically with ``BPF_TC_F_REPLACE``.

A cgroup program is attached with ``bpf_link_create`` on the cgroup's directory fd
(links are multi-attach: other programs on the cgroup stay), pinned the same way and
updated in place while the cgroup is the same one (node/socklb.py decides which).
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import structlog
from pyroute2 import IPRoute

from tuplet.bpf import _libbpf as C
from tuplet.bpf.libbpf import BPF_TCX_EGRESS, BPF_TCX_INGRESS, check, cstr, errno_of, opts
from tuplet.bpf.programs import Program
from tuplet.core.errors import NotFoundError, NotSupportedError, TupletError

log = structlog.get_logger("tuplet.links")

# Legacy TC filters tuplet installs: fixed handle and priority so they can be found,
# replaced and removed without touching anybody else's filters.
TC_HANDLE = 0x7470
TC_PRIORITY = 0x7470 & 0xFFFF


class Hook(str, Enum):
    INGRESS = "ingress"
    EGRESS = "egress"


class CgroupHook(str, Enum):
    """Socket-address hooks of a cgroup (IPv4 and IPv6), by the libbpf section suffix."""

    CONNECT4 = "connect4"
    SENDMSG4 = "sendmsg4"
    RECVMSG4 = "recvmsg4"
    GETPEERNAME4 = "getpeername4"
    CONNECT6 = "connect6"
    SENDMSG6 = "sendmsg6"
    RECVMSG6 = "recvmsg6"
    GETPEERNAME6 = "getpeername6"


_CGROUP_ATTACH_TYPE = {CgroupHook.CONNECT4: C.BPF_CGROUP_INET4_CONNECT,
                       CgroupHook.SENDMSG4: C.BPF_CGROUP_UDP4_SENDMSG,
                       CgroupHook.RECVMSG4: C.BPF_CGROUP_UDP4_RECVMSG,
                       CgroupHook.GETPEERNAME4: C.BPF_CGROUP_INET4_GETPEERNAME,
                       CgroupHook.CONNECT6: C.BPF_CGROUP_INET6_CONNECT,
                       CgroupHook.SENDMSG6: C.BPF_CGROUP_UDP6_SENDMSG,
                       CgroupHook.RECVMSG6: C.BPF_CGROUP_UDP6_RECVMSG,
                       CgroupHook.GETPEERNAME6: C.BPF_CGROUP_INET6_GETPEERNAME}


class AttachMode(str, Enum):
    AUTO = "auto"     # TCX, legacy TC when the kernel has no TCX
    TCX = "tcx"
    TC = "tc"


@dataclass
class Attachment:
    """One program on one device hook, as recorded in tuplet's state."""

    ifname: str
    ifindex: int
    hook: Hook
    program: str
    mode: AttachMode           # TCX or TC (never AUTO once attached)
    link_pin: str = ""         # TCX: pinned link path
    created_clsact: bool = False  # TC: tuplet created the qdisc, may remove it

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["hook"] = self.hook.value
        d["mode"] = self.mode.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> "Attachment":
        return cls(ifname=str(d["ifname"]), ifindex=int(str(d["ifindex"])),
                   hook=Hook(d["hook"]), program=str(d["program"]), mode=AttachMode(d["mode"]),
                   link_pin=str(d.get("link_pin", "")), created_clsact=bool(d.get("created_clsact")))


def ifindex_of(ifname: str) -> int:
    """Index of a device in the current network namespace."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise NotFoundError(f"interface {ifname}", "look up", errno.ENODEV,
                            "no such device in this network namespace") from None


def link_pin_path(pin_root: str, ifname: str, hook: Hook) -> str:
    # bpffs refuses dots in names
    return os.path.join(pin_root, "links", f"{ifname}-{hook.value}")


# --- TCX ----------------------------------------------------------------------------------------

def _pin_link(fd: int, pin: str, what: str) -> None:
    """Pin a new link at ``pin`` and close its fd: from then on the pin holds the link."""
    try:
        Path(pin).parent.mkdir(parents=True, exist_ok=True)
        check(C.bpf_obj_pin(fd, cstr(pin)), what, f"pin at {pin}")
    finally:
        os.close(fd)


def tcx_attach(prog: Program, ifname: str, hook: Hook, pin_root: str) -> Attachment:
    """Attach with a TCX link pinned under pin_root; update the link if one is pinned already."""
    ifindex = ifindex_of(ifname)
    pin = link_pin_path(pin_root, ifname, hook)
    if os.path.exists(pin):
        fd = C.bpf_obj_get(cstr(pin))
        if fd >= 0:
            try:
                ret = C.bpf_link_update(fd, prog.fd, None)
                if ret == 0:
                    log.info("tcx link updated", ifname=ifname, hook=hook.value, program=prog.name)
                    return Attachment(ifname, ifindex, hook, prog.name, AttachMode.TCX, pin)
                log.warning("stale tcx link replaced", ifname=ifname, hook=hook.value,
                            error=os.strerror(errno_of(ret)))
            finally:
                os.close(fd)
        os.unlink(pin)
    attach_type = BPF_TCX_INGRESS if hook is Hook.INGRESS else BPF_TCX_EGRESS
    o = opts(C.bpf_link_create_opts)
    ctypes.set_errno(0)
    fd = C.bpf_link_create(prog.fd, ifindex, attach_type, ctypes.byref(o))
    if fd < 0:
        err = errno_of(fd)
        if err in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524):
            raise NotSupportedError("TCX attachment", "6.6", f"bpf_link_create: {os.strerror(err)}")
        raise TupletError(f"interface {ifname}", f"tcx attach {hook.value}", err)
    _pin_link(fd, pin, f"tcx link {ifname}/{hook.value}")
    log.info("tcx attached", ifname=ifname, hook=hook.value, program=prog.name, pin=pin)
    return Attachment(ifname, ifindex, hook, prog.name, AttachMode.TCX, pin)


def pinned_link_prog_id(pin: str) -> int:
    """The id of the program a pinned link runs now (0 when the pin is not a link)."""
    fd = C.bpf_obj_get(cstr(pin))
    if fd < 0:
        check(fd, f"link {pin}", "open")
    try:
        info = C.bpf_link_info()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(C.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"link {pin}", "get info")
        return int(info.prog_id)
    finally:
        os.close(fd)


def tcx_detach(att: Attachment) -> None:
    """Detach a pinned TCX link (the pin is the last reference: unlinking releases it)."""
    if att.link_pin and os.path.exists(att.link_pin):
        fd = C.bpf_obj_get(cstr(att.link_pin))
        if fd >= 0:
            C.bpf_link_detach(fd)  # explicit: also detaches if someone else holds the link
            os.close(fd)
        os.unlink(att.link_pin)
    log.info("tcx detached", ifname=att.ifname, hook=att.hook.value)


# --- cgroup links -------------------------------------------------------------------------------

def cgroup_link_pin_path(pin_root: str, hook: CgroupHook, staged: bool = False) -> str:
    """Where the link of a cgroup hook is pinned; ``staged``: a new link waiting for its apply
    to complete (bpffs refuses dots in names)."""
    return os.path.join(pin_root, "links", f"cgroup-{'new-' if staged else ''}{hook.value}")


def cgroup_id(cgroup: str) -> int:
    """The kernel's id of a cgroup v2 directory (its inode number on cgroup2)."""
    try:
        return os.stat(cgroup).st_ino
    except OSError as e:
        raise NotFoundError(f"cgroup {cgroup}", "open", e.errno or 0, "not a cgroup v2 directory") from None


class CgroupLink(NamedTuple):
    """A pinned cgroup link: its id, the program it runs and the cgroup it is on (0s: none)."""

    link_id: int
    prog_id: int
    cgroup_id: int


def pinned_cgroup_link(pin: str) -> CgroupLink:
    """The pinned cgroup link at pin; all zeros when nothing is pinned there."""
    if not os.path.exists(pin):
        return CgroupLink(0, 0, 0)
    fd = C.bpf_obj_get(cstr(pin))
    check(fd, f"link {pin}", "open")
    try:
        info = C.bpf_link_info()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(C.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"link {pin}", "get info")
        return CgroupLink(int(info.id), int(info.prog_id), int(info._anon0.cgroup.cgroup_id))
    finally:
        os.close(fd)


def cgroup_link_update(pin: str, prog: Program) -> None:
    """Make the pinned cgroup link at pin run prog (atomically: no call sees neither)."""
    fd = C.bpf_obj_get(cstr(pin))
    check(fd, f"link {pin}", "open")
    try:
        check(C.bpf_link_update(fd, prog.fd, None), f"cgroup link {pin}", "update")
    finally:
        os.close(fd)
    log.info("cgroup link updated", pin=pin, program=prog.name)


def cgroup_link_create(prog: Program, cgroup: str, hook: CgroupHook, pin: str) -> None:
    """Attach prog to a cgroup v2 directory's hook with a new link pinned at pin (links are
    multi-attach: other programs on the cgroup, and a link at another pin, stay)."""
    try:
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise NotFoundError(f"cgroup {cgroup}", "open", e.errno or 0, "not a cgroup v2 directory") from None
    try:
        o = opts(C.bpf_link_create_opts)
        ctypes.set_errno(0)
        fd = C.bpf_link_create(prog.fd, cg, _CGROUP_ATTACH_TYPE[hook], ctypes.byref(o))
        check(fd, f"cgroup {cgroup}", f"attach {hook.value}")
    finally:
        os.close(cg)
    _pin_link(fd, pin, f"cgroup link {hook.value}")
    log.info("cgroup attached", cgroup=cgroup, hook=hook.value, program=prog.name, pin=pin)


def cgroup_detach(pin: str) -> None:
    """Detach and unpin a pinned cgroup link (nothing pinned: nothing to do)."""
    if not os.path.exists(pin):
        return
    fd = C.bpf_obj_get(cstr(pin))
    if fd >= 0:
        C.bpf_link_detach(fd)  # explicit: also detaches if someone else holds the link
        os.close(fd)
    os.unlink(pin)
    log.info("cgroup link detached", pin=pin)


# --- legacy TC ----------------------------------------------------------------------------------

def _tc_hook(ifindex: int, hook: Hook) -> ctypes.Structure:
    point = C.BPF_TC_INGRESS if hook is Hook.INGRESS else C.BPF_TC_EGRESS
    return opts(C.bpf_tc_hook, ifindex=ifindex, attach_point=point)


def has_clsact(ifindex: int) -> bool:
    """True when the device has a clsact qdisc (current network namespace)."""
    with IPRoute() as ipr:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def tc_attach(prog: Program, ifname: str, hook: Hook) -> Attachment:
    """Attach as a direct-action cls_bpf filter in clsact, replacing tuplet's previous one."""
    ifindex = ifindex_of(ifname)
    h = _tc_hook(ifindex, hook)
    created = False
    if not has_clsact(ifindex):
        ret = C.bpf_tc_hook_create(ctypes.byref(h))
        if ret == 0:
            created = True
        elif errno_of(ret) != errno.EEXIST:
            check(ret, f"interface {ifname}", "create clsact qdisc")
    o = opts(C.bpf_tc_opts, prog_fd=prog.fd, handle=TC_HANDLE, priority=TC_PRIORITY,
             flags=C.BPF_TC_F_REPLACE)
    check(C.bpf_tc_attach(ctypes.byref(h), ctypes.byref(o)), f"interface {ifname}", f"tc attach {hook.value}")
    log.info("tc attached", ifname=ifname, hook=hook.value, program=prog.name, created_clsact=created)
    return Attachment(ifname, ifindex, hook, prog.name, AttachMode.TC, created_clsact=created)


def tc_detach(att: Attachment) -> None:
    """Remove tuplet's filter; remove clsact too when tuplet created it and nothing else uses it."""
    try:
        ifindex = ifindex_of(att.ifname)
    except NotFoundError:
        return  # device gone: its qdisc and filters went with it
    if not has_clsact(ifindex):
        return  # qdisc gone: its filters went with it
    h = _tc_hook(ifindex, att.hook)
    o = opts(C.bpf_tc_opts, handle=TC_HANDLE, priority=TC_PRIORITY)
    ret = C.bpf_tc_detach(ctypes.byref(h), ctypes.byref(o))
    if ret < 0 and errno_of(ret) not in (errno.ENOENT, errno.EINVAL):
        check(ret, f"interface {att.ifname}", f"tc detach {att.hook.value}")
    log.info("tc detached", ifname=att.ifname, hook=att.hook.value)


def tc_destroy_clsact(ifname: str) -> None:
    """Remove the clsact qdisc tuplet created (both directions at once)."""
    try:
        ifindex = ifindex_of(ifname)
    except NotFoundError:
        return
    h = opts(C.bpf_tc_hook, ifindex=ifindex, attach_point=C.BPF_TC_INGRESS | C.BPF_TC_EGRESS)
    ret = C.bpf_tc_hook_destroy(ctypes.byref(h))
    if ret < 0 and errno_of(ret) not in (errno.ENOENT, errno.EINVAL):
        check(ret, f"interface {ifname}", "destroy clsact qdisc")


def tc_has_filter(ifname: str, hook: Hook) -> bool:
    """True when tuplet's filter is on the hook."""
    if not has_clsact(ifindex_of(ifname)):
        return False
    h = _tc_hook(ifindex_of(ifname), hook)
    o = opts(C.bpf_tc_opts, handle=TC_HANDLE, priority=TC_PRIORITY)
    return bool(C.bpf_tc_query(ctypes.byref(h), ctypes.byref(o)) == 0)


def attached_prog_id(att: Attachment) -> int:
    """The id of the program on att's hook now (0: nothing of tuplet's is there)."""
    if att.mode is AttachMode.TCX:
        return pinned_link_prog_id(att.link_pin) if att.link_pin and os.path.exists(att.link_pin) else 0
    if not has_clsact(ifindex_of(att.ifname)):
        return 0
    h = _tc_hook(ifindex_of(att.ifname), att.hook)
    o = opts(C.bpf_tc_opts, handle=TC_HANDLE, priority=TC_PRIORITY)
    return int(o.prog_id) if C.bpf_tc_query(ctypes.byref(h), ctypes.byref(o)) == 0 else 0


# --- either -------------------------------------------------------------------------------------

def attach(prog: Program, ifname: str, hook: Hook, pin_root: str, mode: AttachMode) -> Attachment:
    """Attach with TCX, or legacy TC when forced or when the kernel has no TCX (mode AUTO)."""
    if mode is AttachMode.TC:
        return tc_attach(prog, ifname, hook)
    try:
        return tcx_attach(prog, ifname, hook, pin_root)
    except NotSupportedError:
        if mode is AttachMode.TCX:
            raise
        log.info("tcx unavailable, using legacy tc", ifname=ifname, hook=hook.value)
        return tc_attach(prog, ifname, hook)


def detach(att: Attachment) -> None:
    if att.mode is AttachMode.TCX:
        tcx_detach(att)
    else:
        tc_detach(att)
