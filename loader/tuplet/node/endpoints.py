"""Live endpoints: pods added to and removed from a running datapath, one at a time,
without reloading anything (`tuplet endpoint`, the CNI plugin).

Add attaches the pod programs ``apply`` pinned under ``<pin root>/progs`` to the pod's
host-side veth (TCX, or legacy TC as the node's attachments) and writes the endpoint
map (``tpl_ep4_v1`` by its IPv4 address, ``tpl_ep6_v1`` by its IPv6 one: an endpoint
has either or both); no other device is touched. Delete detaches, removes the endpoint,
then deletes the conntrack entries of its addresses (both families' tables) and the NAT
entries they own
(:mod:`tuplet.conntrack.flush`).

Every step runs under the node lock, and the node state records the endpoint *before*
the datapath changes (phase ``adding`` / ``deleting``). A command killed between two
steps leaves such a record; the next command under the lock (any endpoint command,
``apply``, the CNI plugin) finds it first and undoes the add (detach both hooks, remove
the map entry if it is this endpoint's) or finishes the delete (detach, remove, flush
again), and reports it.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass

import structlog

from tuplet.bpf.links import (
    Attachment,
    AttachMode,
    attach,
    has_clsact,
    ifindex_of,
    link_pin_path,
    tc_has_filter,
)
from tuplet.bpf.programs import Program
from tuplet.conntrack.flush import FlushResult, flush_pinned
from tuplet.core import crashpoints
from tuplet.core.errors import ConfigError, NotFoundError, TupletError
from tuplet.datapath import abi, paths
from tuplet.datapath.layouts import EndpointInfo
from tuplet.node import netns, state
from tuplet.node.config import ip_of
from tuplet.node.hooks import remove_attachments
from tuplet.node.lock import node_lock
from tuplet.node.state import PHASE_ADDING, PHASE_DELETING, PHASE_READY, EndpointRecord, NodeState

log = structlog.get_logger("tuplet.endpoints")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class EndpointConflictError(ConfigError):
    """The name, interface or address of a new endpoint is taken (``holder`` has it)."""

    def __init__(self, key: str, detail: str, holder: EndpointRecord) -> None:
        self.holder = holder
        super().__init__(key, detail)


@dataclass
class Recovered:
    """A live endpoint a killed command left half done, and what this command did about it."""

    record: EndpointRecord
    action: str                   # "add undone" | "delete finished"
    flushed: FlushResult | None = None

    def describe(self) -> str:
        extra = f"; deleted {self.flushed.describe()}" if self.flushed else ""
        return f"endpoint {self.record.name}: an interrupted command left it half done: {self.action}{extra}"


@dataclass
class Deleted:
    record: EndpointRecord
    flushed: FlushResult
    recovered: list[Recovered]


#: The endpoint map of each address family.
EP_MAPS = {4: abi.EP_MAP, 6: abi.EP6_MAP}


def ep_key(addr: str) -> tuple[str, bytes]:
    """(endpoint map, key) of an endpoint address: tpl_ep4_v1 by the be32 IPv4 address,
    tpl_ep6_v1 by the 16-byte union v6addr."""
    a = ipaddress.ip_address(addr)
    return EP_MAPS[a.version], a.packed


def _write_keys(pin_root: str, addrs: tuple[str, ...], info: EndpointInfo | None) -> None:
    """Write ``info`` under each address's key (None: delete the keys)."""
    for name, key in map(ep_key, addrs):
        with paths.open_pinned(pin_root, name) as ep:
            if info is None:
                ep.delete(key)
            else:
                ep.update(key, info)


def _load(pin_root: str) -> NodeState:
    st = state.load(pin_root)
    if st is None or not paths.is_pinned(pin_root, abi.EP_MAP):
        raise NotFoundError(f"datapath under {pin_root}", "find",
                            detail="not applied (run `tuplet apply` first)")
    return st


def _detach_endpoint(st: NodeState, rec: EndpointRecord) -> None:
    """Take the pod programs off rec's device, whatever the state recorded (a killed add
    may have attached without recording it), and remove rec's endpoint map entry."""
    recorded = [a for a in st.attachments if a.ifname == rec.ifname]
    guess: list[Attachment] = []
    for prog, hook in abi.LXC_HOOKS:
        pin = link_pin_path(st.pin_root, rec.ifname, hook)
        if os.path.exists(pin) and not any(a.link_pin == pin for a in recorded):
            guess.append(Attachment(rec.ifname, 0, hook, prog, AttachMode.TCX, pin))
        with contextlib.suppress(TupletError):
            if tc_has_filter(rec.ifname, hook) and not any(a.mode is AttachMode.TC and a.hook is hook
                                                           for a in recorded):
                guess.append(Attachment(rec.ifname, 0, hook, prog, AttachMode.TC,
                                        created_clsact=not rec.had_clsact))
    atts = recorded + guess
    for a in atts:
        if a.mode is AttachMode.TC and not rec.had_clsact:
            a.created_clsact = True
    remove_attachments(atts)
    st.attachments = [a for a in st.attachments if a.ifname != rec.ifname]
    _write_keys(st.pin_root, rec.addresses, None)   # the addresses are rec's: no other record may hold them


def recover(st: NodeState) -> list[Recovered]:
    """Undo interrupted adds and finish interrupted deletes (caller holds the lock, in the
    node's namespace). Saves the state when it changed anything."""
    done: list[Recovered] = []
    for rec in [r for r in st.live.values() if r.phase != PHASE_READY]:
        _detach_endpoint(st, rec)
        if rec.phase == PHASE_DELETING:
            flushed = flush_pinned(st.pin_root, rec.addresses, reason=abi.CT_NOTIFY_R_ENDPOINT)
            done.append(Recovered(rec, "delete finished", flushed))
        else:
            done.append(Recovered(rec, "add undone"))
        del st.live[rec.name]
        state.save(st)
        log.warning("interrupted endpoint command recovered", endpoint=rec.name, action=done[-1].action)
    return done


def _check_new(st: NodeState, rec: EndpointRecord) -> None:
    if not NAME_RE.match(rec.name):
        raise ConfigError("name", f"{rec.name!r} is not a valid endpoint name (letters, digits, '_.:-')")
    if not rec.addresses:
        raise ConfigError("--ipv4", "an endpoint needs an IPv4 or an IPv6 address (--ipv4, --ipv6, or both)")
    rec.ipv4, rec.ipv6 = (_pod_address(f"--ipv{v}", a, v) if a else "" for a, v in ((rec.ipv4, 4), (rec.ipv6, 6)))
    if not 0 <= rec.identity <= 0xFFFFFFFF:
        raise ConfigError("--identity", f"must be between 0 and 4294967295, got {rec.identity}")
    for other in st.all_endpoints():
        where = f"endpoint {other.name!r} (from {other.source})"
        if other.name == rec.name:
            raise EndpointConflictError("name", f"{rec.name!r} is taken by {where}", other)
        if other.ifname == rec.ifname:
            raise EndpointConflictError("--ifname", f"interface {rec.ifname} is taken by {where}", other)
        for flag, a in (("--ipv4", rec.ipv4), ("--ipv6", rec.ipv6)):
            if a and a in other.addresses:
                raise EndpointConflictError(flag, f"address {a} is taken by {where}", other)
    devs = {a.ifname for a in st.attachments if a.program not in dict(abi.LXC_HOOKS)}
    if rec.ifname in devs:
        raise ConfigError("--ifname", f"interface {rec.ifname} is a node device of this datapath")


def _pod_address(flag: str, text: str, version: int) -> str:
    """``text`` as a pod address of IPv{version} (normalized), or a ConfigError naming ``flag``."""
    addr = ip_of(flag, text, version)
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
        raise ConfigError(flag, f"{text} cannot be a pod address")
    return str(addr)


def add(pin_root: str, rec: EndpointRecord) -> tuple[EndpointRecord, list[Recovered]]:
    """Attach the pod programs to rec.ifname and program its endpoint entry."""
    with node_lock(pin_root):
        st = _load(pin_root)
        with netns.maybe_enter(st.netns):
            recovered = recover(st)
            _check_new(st, rec)
            ifindex = ifindex_of(rec.ifname)
            progs = {p: os.path.join(pin_root, abi.PROGS_DIR, p) for p, _ in abi.LXC_HOOKS}
            missing = [p for p in progs.values() if not os.path.exists(p)]
            if missing:
                raise NotFoundError(f"pinned program {missing[0]}", "open",
                                    detail="the datapath was applied by an older tuplet: run `tuplet apply` again")
            rec.phase = PHASE_ADDING
            rec.had_clsact = has_clsact(ifindex)
            st.live[rec.name] = rec
            state.save(st)
            crashpoints.point("endpoint.add-recorded")
            made: list[Attachment] = []
            try:
                _write_keys(pin_root, rec.addresses, EndpointInfo(ifindex=ifindex, sec_id=rec.identity))
                crashpoints.point("endpoint.add-mapped")
                mode = AttachMode(st.attach_mode)
                for prog_name, hook in abi.LXC_HOOKS:
                    prog = Program.from_pin(progs[prog_name])
                    try:
                        made.append(attach(prog, rec.ifname, hook, pin_root, mode))
                    finally:
                        prog.close()
                    crashpoints.point(f"endpoint.add-attached-{hook.value}")
                for a in made:
                    a.created_clsact = a.mode is AttachMode.TC and not rec.had_clsact
            except BaseException:
                _detach_endpoint(st, rec)
                del st.live[rec.name]
                state.save(st)
                raise
            rec.phase = PHASE_READY
            st.attachments += made
            state.save(st)
    log.info("endpoint added", endpoint=rec.name, ifname=rec.ifname, addresses=list(rec.addresses),
             identity=rec.identity,
             source=rec.source, modes=sorted({a.mode.value for a in made}))
    return rec, recovered


def delete(pin_root: str, name: str, missing_ok: bool = False) -> Deleted | None:
    """Detach and remove a live endpoint, then flush its conntrack and NAT entries."""
    with node_lock(pin_root):
        st = _load(pin_root)
        with netns.maybe_enter(st.netns):
            recovered = recover(st)
            rec = st.live.get(name)
            if rec is None:
                conf = [e for e in st.configured if e.name == name]
                if conf:
                    raise ConfigError("name", f"endpoint {name!r} is from the node file: remove it there "
                                              "and run `tuplet apply`")
                finished = [r for r in recovered if r.record.name == name and r.flushed is not None]
                if finished:   # this delete was interrupted before: finished now
                    return Deleted(finished[0].record, finished[0].flushed or FlushResult(), recovered)
                if missing_ok:
                    return None
                raise NotFoundError(f"endpoint {name}", "delete", detail="no such live endpoint")
            rec.phase = PHASE_DELETING
            state.save(st)
            crashpoints.point("endpoint.delete-marked")
            _detach_endpoint(st, rec)
            crashpoints.point("endpoint.delete-detached")
            flushed = flush_pinned(pin_root, rec.addresses, reason=abi.CT_NOTIFY_R_ENDPOINT)
            crashpoints.point("endpoint.delete-flushed")
            del st.live[name]
            state.save(st)
    log.info("endpoint deleted", endpoint=name, ifname=rec.ifname, addresses=list(rec.addresses),
             ct_deleted=flushed.deleted, nat_deleted=flushed.nat_deleted)
    return Deleted(rec, flushed, recovered)


def find(pin_root: str, *, name: str | None = None, owner: str | None = None) -> EndpointRecord | None:
    st = state.load(pin_root)
    if st is None:
        return None
    for e in st.all_endpoints():
        if (name is not None and e.name == name) or (owner is not None and e.owner == owner):
            return e
    return None


def find_datapath(pin_root: str) -> NodeState | None:
    """The node state when a datapath is applied under pin_root, else None."""
    st = state.load(pin_root)
    return st if st is not None and paths.is_pinned(pin_root, abi.EP_MAP) else None


def listing(pin_root: str) -> list[EndpointRecord]:
    st = state.load(pin_root)
    return sorted(st.all_endpoints(), key=lambda e: e.name) if st else []


def map_entries(pin_root: str) -> dict[str, EndpointInfo]:
    """The endpoint maps (both families) as the datapath sees them: address -> entry."""
    out: dict[str, EndpointInfo] = {}
    for name in EP_MAPS.values():
        if paths.is_pinned(pin_root, name):
            with paths.open_pinned(pin_root, name) as ep:
                out.update({str(ipaddress.ip_address(k)): EndpointInfo.from_buffer_copy(v) for k, v in ep.items()})
    return out

