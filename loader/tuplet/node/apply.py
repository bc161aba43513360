"""The node's datapath: load the objects with the node's configuration, attach
them to its devices, program its endpoints, and remove it all again.

``apply`` is all-or-nothing: configuration, interfaces and pinned maps are
checked before anything changes, and a failure while attaching undoes what this
run attached and the pins it created. A conntrack or NAT table whose configured
size changed is resized live (:mod:`tuplet.conntrack.resize`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tuplet.bpf import bpffs
from tuplet.bpf.links import Attachment, AttachMode, Hook, attach, ifindex_of
from tuplet.bpf.maps import Map
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.conntrack import resize, sentinels
from tuplet.conntrack.sizing import Sizing
from tuplet.core import crashpoints
from tuplet.core.errors import ConfigError, NotFoundError, TupletError
from tuplet.datapath import abi, clock, cttables, paths
from tuplet.datapath.abi import (
    CT_MAP_ANY,
    CT_MAP_SYN,
    CT_MAP_TCP,
    EP_MAP,
    LXC_HOOKS,
    NAT_MAP,
    NETDEV_HOOKS,
    OBJ_HOST,
    OBJ_LXC,
    OBJ_OVERLAY,
    OVERLAY_HOOKS,
    PROGS_DIR,
)
from tuplet.datapath.layouts import EndpointInfo
from tuplet.datapath.paths import object_dir
from tuplet.lb import registry
from tuplet.lb import writer as lb
from tuplet.node import endpoints, ipcache, netns, overlay, socklb, state
from tuplet.node.config import Endpoint, NodeConfig
from tuplet.node.hooks import remove_attachments
from tuplet.node.lock import node_lock

log = structlog.get_logger("tuplet.datapath")

def open_object(name: str, cfg: NodeConfig, pin_root: str | None, sizing: Sizing | None = None,
                overlay_ifindex: int = 0, obj_dir: Path | None = None) -> ObjectSpec:
    """Open one object (from obj_dir, default the installed build) and apply the node's load-time
    configuration to it."""
    ct = cfg.conntrack
    sizing = sizing or ct.sizing()
    spec = ObjectSpec.open((obj_dir or object_dir()) / name, pin_root=pin_root)
    try:
        present = spec.maps
        # The IPv4 tables' sizes; an IPv6 table is sized as its IPv4 twin (cttables.sized_as).
        v4 = {CT_MAP_TCP: sizing.tcp.entries, CT_MAP_ANY: sizing.any.entries, NAT_MAP: sizing.nat.entries,
              CT_MAP_SYN: ct.syn_entries(sizing)}
        for map_name in (*cttables.NAMES, *cttables.NAT_NAMES):
            if map_name in present:
                spec.set_max_entries(map_name, v4[cttables.sized_as(map_name)])
        for var, value in ct.timeouts.rodata().items():
            spec.set_const(var, value)
        spec.set_const("ct_report_flags", ct.report_flags)
        spec.set_const("ct_accounting", int(ct.accounting))
        spec.set_const("ct_syn_table", int(ct.syn_table))
        clock.apply_test_offset(spec)   # tests only: their clock reads near zero
        if overlay_ifindex:
            spec.set_const("overlay_ifindex", overlay_ifindex)
    except BaseException:
        spec.close()
        raise
    return spec


in_node_netns = netns.maybe_enter


@dataclass
class ApplyResult:
    attachments: list[Attachment]
    endpoints: int
    reused_pins: list[str]
    resized: list[resize.Resized] = field(default_factory=list)


def apply(cfg: NodeConfig) -> ApplyResult:
    """Make the node's datapath match cfg (under the node lock)."""
    pin_root = str(bpffs.ensure_pin_root(cfg.pin_root))
    with node_lock(pin_root), in_node_netns(cfg.netns):
        return _apply(cfg, pin_root)


def _apply(cfg: NodeConfig, pin_root: str) -> ApplyResult:
    old = state.load(pin_root) or state.NodeState(pin_root=pin_root, netns=cfg.netns)
    resize.remove_stray_pins(pin_root)   # a resize killed before its rename
    if paths.is_pinned(pin_root, EP_MAP):
        endpoints.recover(old)   # live endpoint commands a SIGKILL interrupted
    live = [e for e in old.live.values() if e.phase == state.PHASE_READY]
    _check_live_clash(cfg, live)
    live_here = [e for e in live if _exists(e.ifname)]

    missing = []
    for ifname in [e.ifname for e in cfg.endpoints] + [d.ifname for d in cfg.devices]:
        if not _exists(ifname):
            missing.append(ifname)
    if missing:
        where = f"network namespace {cfg.netns}" if cfg.netns else "this network namespace"
        raise NotFoundError(f"interface{'s' if len(missing) > 1 else ''} {', '.join(missing)}", "apply",
                            detail=f"not found in {where}; nothing was changed")

    registry.check_config(pin_root, cfg.services)
    overlay_ifindex = 0
    if cfg.overlay:
        # Before anything else changes: without Geneve support this fails and nothing was done.
        overlay_ifindex, _ = overlay.ensure_device(cfg.overlay.device)
    # Socket LB: the cgroup must exist before anything changes.
    sock_cgroup = socklb.resolve_cgroup(cfg.lb.socket_lb_cgroup) if cfg.lb.socket_lb else ""
    if sock_cgroup and not os.path.isdir(sock_cgroup):
        raise NotFoundError(f"cgroup {sock_cgroup}", "apply", detail="[lb] socket_lb_cgroup: no such "
                            "cgroup v2 directory; nothing was changed")
    sizing = cfg.conntrack.sizing()
    colls: list[Collection] = []
    sock: socklb.Change | None = None
    new_pins: list[str] = []
    reused: list[str] = []
    made: list[Attachment] = []
    attachments: list[Attachment] = []
    specs: list[ObjectSpec] = []
    resizer = resize.Resizer(pin_root)
    try:
        objs = (OBJ_LXC, OBJ_HOST) + ((OBJ_OVERLAY,) if cfg.overlay else ())
        for obj in objs:
            specs.append(open_object(obj, cfg, pin_root, sizing, overlay_ifindex))
        resizer.prepare(specs)   # pins that differ only in size: new maps the objects use instead
        for spec in specs:
            coll = spec.load()   # checks every existing pin first; reuses or refuses
            colls.append(coll)
            reused += [p for p in coll.reused_pins if p not in new_pins and p not in reused]
            new_pins += [p for p in _pin_paths(coll, pin_root)
                         if p not in coll.reused_pins and p not in resizer.pins]
        for name in cttables.NAMES:   # a CT table created just now: its sentinels (resize seeds its own)
            m = coll_map(colls, name)
            if m is not None and os.path.join(pin_root, name) in new_pins:
                sentinels.seed(m)
        crashpoints.point("apply.loaded")
        resizer.copy()           # live entries into the new maps, just before the swap
        resizer.save_programs(old.attachments)
        lxc, host = colls[:2]
        if any(p.endswith(abi.SERVICES_MAP) for p in new_pins):
            paths.services_path(pin_root).unlink(missing_ok=True)   # describes service maps that are gone
        _sync_endpoints(lxc, cfg, live)
        ipcache.sync_config({n: coll_map(colls, n) for n in ipcache.MAPS.values()}, cfg.ipcache, old.ipcache)
        plan: list[tuple[Collection, str, tuple[tuple[str, Hook], ...]]] = [
            (lxc, ep.ifname, LXC_HOOKS) for ep in cfg.endpoints]
        plan += [(lxc, ep.ifname, LXC_HOOKS) for ep in live_here]   # live ones get this build's programs
        plan += [(host, dev.ifname, NETDEV_HOOKS) for dev in cfg.devices]
        if cfg.overlay:
            plan.append((colls[2], cfg.overlay.device, OVERLAY_HOOKS))
        for coll, ifname, hooks in plan:
            for prog, hook in hooks:
                existed = any(a.ifname == ifname and a.hook is hook for a in old.attachments)
                att = attach(coll.programs[prog], ifname, hook, pin_root, cfg.attach_mode)
                if not existed:
                    made.append(att)
                attachments.append(att)
        if sock_cgroup:   # after the pod programs: a backend's own replies are tracked first
            sock = socklb.attach(pin_root, sock_cgroup)
            new_pins += [p for p in _pin_paths(sock.coll, pin_root)
                         if p not in sock.coll.reused_pins and p not in new_pins]
        crashpoints.point("apply.attached")
        services = lb.sync_config(pin_root, cfg.services, {a for e in cfg.endpoints for a in e.addresses},
                                  cfg.lb.maglev_table_size)
    except BaseException:
        undo = resizer.rollback(attachments, made)   # programs that ran before back, if swapped
        if sock:
            sock.rollback()   # the old cgroup's links as they were
        with contextlib.suppress(TupletError, OSError):
            remove_attachments(list(reversed(made + undo)))
        for p in new_pins:
            with contextlib.suppress(OSError):
                os.unlink(p)
        if any(p.endswith(abi.SERVICES_MAP) for p in new_pins):
            paths.services_path(pin_root).unlink(missing_ok=True)   # it described the maps just removed
        for coll in colls:
            coll.close()
        resizer.close()
        raise
    finally:
        for spec in specs:
            spec.close()
    _pin_programs(colls[0], pin_root)
    for coll in colls:
        coll.close()
    if sock:
        sock.commit()             # a moved socket_lb_cgroup: the old cgroup's links go now
    else:
        socklb.detach(pin_root)   # [lb] socket_lb turned off

    # Attachments this configuration no longer has, or now has in the other mode (the new
    # one is in place already, so the hook is never without a program).
    keep = {(a.ifname, a.hook, a.mode) for a in attachments}
    remove_attachments([a for a in old.attachments if (a.ifname, a.hook, a.mode) not in keep],
                        keep_clsact={a.ifname for a in attachments if a.mode is AttachMode.TC})
    created = {a.ifname for a in [*old.attachments, *attachments] if a.created_clsact}
    for a in attachments:
        if a.mode is AttachMode.TC and a.ifname in created:
            a.created_clsact = True
    crashpoints.point("apply.swapped")
    resized = resizer.finish()   # old programs are off every hook now: late entries, then the pins
    crashpoints.point("apply.before-state")
    state.save(state.NodeState(pin_root=pin_root, netns=cfg.netns, attachments=attachments,
                               endpoints={a: e.ifname for e in cfg.endpoints for a in e.addresses},
                               sizing=sizing.to_json(),
                               gc={"interval": cfg.conntrack.gc_interval,
                                   "max_interval": cfg.conntrack.gc_max_interval},
                               attach_mode=cfg.attach_mode.value,
                               configured=[state.EndpointRecord(e.name, e.ifname, e.ipv4, e.identity,
                                                                ipv6=e.ipv6) for e in cfg.endpoints],
                               live={e.name: e for e in live},
                               ipcache=[c.prefix for c in cfg.ipcache], socket_lb_cgroup=sock_cgroup))
    socklb.after_service_change(pin_root)   # connected UDP sockets of backends just removed
    log.info("applied", node=cfg.name, endpoints=len(cfg.endpoints), attachments=len(attachments),
             services={k: len(v) for k, v in services.items() if v},
             modes=sorted({a.mode.value for a in attachments}), reused_pins=len(reused),
             resized=[r.map for r in resized])
    return ApplyResult(attachments=attachments, endpoints=len(cfg.endpoints), reused_pins=reused,
                       resized=resized)


def _pin_paths(coll: Collection, pin_root: str) -> list[str]:
    return [os.path.join(pin_root, name) for name in coll.maps if not name.startswith(".")
            and "." not in name]


def _exists(ifname: str) -> bool:
    try:
        ifindex_of(ifname)
        return True
    except NotFoundError:
        return False


def coll_map(colls: list[Collection], name: str) -> Map | None:
    """The map ``name`` of the first collection that has it."""
    return next((c.maps[name] for c in colls if name in c.maps), None)


def _check_live_clash(cfg: NodeConfig, live: list[state.EndpointRecord]) -> None:
    """Refuse, before anything changes, configured endpoints that take a live one's place."""
    for i, e in enumerate(cfg.endpoints):
        for other in live:
            for attr, theirs in (("name", (other.name,)), ("ifname", (other.ifname,)),
                                 ("ipv4", other.addresses), ("ipv6", other.addresses)):
                if getattr(e, attr) and getattr(e, attr) in theirs:
                    raise ConfigError(f"endpoints[{i}].{attr}",
                                      f"{getattr(e, attr)} is live endpoint {other.name!r} (added with "
                                      f"`tuplet endpoint add` or the CNI plugin; delete it first)")


def _pin_programs(lxc: Collection, pin_root: str) -> None:
    """Pin the pod programs (replacing the previous pins atomically) for live endpoints."""
    d = Path(pin_root) / PROGS_DIR
    d.mkdir(exist_ok=True)
    for prog, _hook in LXC_HOOKS:
        tmp = d / f"new-{prog}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        lxc.programs[prog].pin(str(tmp))
        os.rename(tmp, d / prog)


def _sync_endpoints(coll: Collection, cfg: NodeConfig, live: list[state.EndpointRecord]) -> None:
    """Make the endpoint maps (both families) hold exactly the configured endpoints and the live ones."""
    maps = {name: coll.maps[name] for name in endpoints.EP_MAPS.values()}
    wanted: dict[str, dict[bytes, EndpointInfo]] = {name: {} for name in maps}
    eps: list[Endpoint | state.EndpointRecord] = [*cfg.endpoints, *live]
    for ep in eps:
        keys = [endpoints.ep_key(a) for a in ep.addresses]
        try:
            ifindex = ifindex_of(ep.ifname)
        except NotFoundError:   # a live endpoint whose device went: keep what the map says
            name, key = keys[0]
            ifindex = EndpointInfo.from_buffer_copy(maps[name].lookup(key) or bytes(16)).ifindex
        for name, key in keys:
            wanted[name][key] = EndpointInfo(ifindex=ifindex, sec_id=ep.identity)
    for name, epmap in maps.items():
        for key, info in wanted[name].items():
            epmap.update(key, info)
        for key in list(epmap.keys()):
            if key not in wanted[name]:
                epmap.delete(key)


def teardown(pin_root: str, netns_name: str | None = None, keep_maps: bool = False) -> list[Attachment]:
    """Detach everything tuplet attached under pin_root (live endpoints too) and (unless
    keep_maps) unpin its maps. Holds the node lock."""
    with node_lock(pin_root):
        return _teardown(pin_root, netns_name, keep_maps)


def _teardown(pin_root: str, netns_name: str | None, keep_maps: bool) -> list[Attachment]:
    st = state.load(pin_root)
    ns = netns_name or (st.netns if st else None)
    removed: list[Attachment] = []
    if ns and not netns.exists(ns):
        ns = None  # the namespace (and every device in it) is gone already
    with in_node_netns(ns):
        removed = list(st.attachments) if st else []
        remove_attachments(removed)
        if st and paths.is_pinned(pin_root, EP_MAP):
            endpoints.recover(st)   # a live endpoint a killed command left half attached
    socklb.detach(pin_root)
    links_dir = Path(pin_root) / "links"
    if links_dir.exists():
        bpffs.remove_tree(links_dir)   # pinned links tuplet has no record of
    if not keep_maps:
        bpffs.remove_tree(pin_root)
    state.remove(pin_root, keep_services=keep_maps)
    log.info("torn down", pin_root=pin_root, attachments=len(removed), maps_removed=not keep_maps)
    return removed
