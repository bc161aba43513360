"""The node's datapath: load the objects with the node's configuration, attach
them to its devices, program its endpoints, and remove it all again.

``apply`` is all-or-nothing: configuration, interfaces and pinned maps are
checked before anything changes, and a failure while attaching undoes what this
run attached and the pins it created. A conntrack or NAT table whose configured
size changed is resized live (:mod:`tuplet.resize`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import structlog

from tuplet.bpf import bpffs
from tuplet.bpf.links import Attachment, AttachMode, attach, detach, ifindex_of, tc_destroy_clsact
from tuplet.bpf.objects import Collection, ObjectSpec
from tuplet.conntrack import resize
from tuplet.conntrack.sizing import Sizing
from tuplet.core import crashpoints
from tuplet.core.errors import NotFoundError, TupletError
from tuplet.datapath import abi, clock, paths
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
)
from tuplet.datapath.layouts import EndpointInfo, ip_to_be32
from tuplet.datapath.paths import object_dir
from tuplet.lb import registry
from tuplet.lb import writer as lb
from tuplet.node import netns, overlay, state
from tuplet.node.config import NodeConfig

log = structlog.get_logger("tuplet.datapath")

def open_object(name: str, cfg: NodeConfig, pin_root: str | None, sizing: Sizing | None = None,
                overlay_ifindex: int = 0) -> ObjectSpec:
    """Open one object and apply the node's load-time configuration to it."""
    ct = cfg.conntrack
    sizing = sizing or ct.sizing()
    spec = ObjectSpec.open(object_dir() / name, pin_root=pin_root)
    try:
        present = spec.maps
        sizes = {CT_MAP_TCP: sizing.tcp.entries, CT_MAP_ANY: sizing.any.entries, NAT_MAP: sizing.nat.entries,
                 CT_MAP_SYN: ct.syn_entries(sizing)}
        for map_name, entries in sizes.items():
            if map_name in present:
                spec.set_max_entries(map_name, entries)
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


@contextlib.contextmanager
def in_node_netns(name: str | None) -> Iterator[None]:
    if name:
        with netns.enter(name):
            yield
    else:
        yield


@dataclass
class ApplyResult:
    attachments: list[Attachment]
    endpoints: int
    reused_pins: list[str]
    resized: list[resize.Resized] = field(default_factory=list)


def apply(cfg: NodeConfig) -> ApplyResult:
    """Make the node's datapath match cfg."""
    with in_node_netns(cfg.netns):
        return _apply(cfg)


def _apply(cfg: NodeConfig) -> ApplyResult:
    pin_root = str(bpffs.ensure_pin_root(cfg.pin_root))
    old = state.load(pin_root) or state.NodeState(pin_root=pin_root, netns=cfg.netns)
    resize.remove_stray_pins(pin_root)   # a resize killed before its rename

    missing = []
    for ifname in [e.ifname for e in cfg.endpoints] + [d.ifname for d in cfg.devices]:
        try:
            ifindex_of(ifname)
        except NotFoundError:
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
    sizing = cfg.conntrack.sizing()
    colls: list[Collection] = []
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
        crashpoints.point("apply.loaded")
        resizer.copy()           # live entries into the new maps, just before the swap
        resizer.save_programs(old.attachments)
        lxc, host = colls[:2]
        if any(p.endswith(abi.SERVICES_MAP) for p in new_pins):
            paths.services_path(pin_root).unlink(missing_ok=True)   # describes service maps that are gone
        _sync_endpoints(lxc, cfg)
        plan = [(lxc, ep.ifname, LXC_HOOKS) for ep in cfg.endpoints]
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
        crashpoints.point("apply.attached")
        services = lb.sync_config(pin_root, cfg.services, {e.ipv4 for e in cfg.endpoints},
                                  cfg.lb.maglev_table_size)
    except BaseException:
        undo = resizer.rollback(attachments, made)   # programs that ran before back, if swapped
        with contextlib.suppress(TupletError, OSError):
            _remove_attachments(list(reversed(made + undo)))
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
    for coll in colls:
        coll.close()

    # Attachments this configuration no longer has, or now has in the other mode (the new
    # one is in place already, so the hook is never without a program).
    keep = {(a.ifname, a.hook, a.mode) for a in attachments}
    _remove_attachments([a for a in old.attachments if (a.ifname, a.hook, a.mode) not in keep],
                        keep_clsact={a.ifname for a in attachments if a.mode is AttachMode.TC})
    created = {a.ifname for a in [*old.attachments, *attachments] if a.created_clsact}
    for a in attachments:
        if a.mode is AttachMode.TC and a.ifname in created:
            a.created_clsact = True
    crashpoints.point("apply.swapped")
    resized = resizer.finish()   # old programs are off every hook now: late entries, then the pins
    crashpoints.point("apply.before-state")
    state.save(state.NodeState(pin_root=pin_root, netns=cfg.netns, attachments=attachments,
                               endpoints={e.ipv4: e.ifname for e in cfg.endpoints},
                               sizing=sizing.to_json(),
                               gc={"interval": cfg.conntrack.gc_interval,
                                   "max_interval": cfg.conntrack.gc_max_interval}))
    log.info("applied", node=cfg.name, endpoints=len(cfg.endpoints), attachments=len(attachments),
             services={k: len(v) for k, v in services.items() if v},
             modes=sorted({a.mode.value for a in attachments}), reused_pins=len(reused),
             resized=[r.map for r in resized])
    return ApplyResult(attachments=attachments, endpoints=len(cfg.endpoints), reused_pins=reused,
                       resized=resized)


def _pin_paths(coll: Collection, pin_root: str) -> list[str]:
    return [os.path.join(pin_root, name) for name in coll.maps if not name.startswith(".")
            and "." not in name]


def _sync_endpoints(coll: Collection, cfg: NodeConfig) -> None:
    """Make the endpoint map hold exactly the configured endpoints."""
    epmap = coll.maps[EP_MAP]
    wanted = {}
    for ep in cfg.endpoints:
        wanted[ip_to_be32(ep.ipv4).to_bytes(4, "little")] = EndpointInfo(
            ifindex=ifindex_of(ep.ifname), sec_id=ep.identity)
    for key, info in wanted.items():
        epmap.update(key, info)
    for key in list(epmap.keys()):
        if key not in wanted:
            epmap.delete(key)


def _remove_attachments(atts: list[Attachment], keep_clsact: set[str] = frozenset()) -> None:
    """Detach; then remove the clsact qdiscs tuplet created that nothing of tuplet's still uses."""
    for a in atts:
        with contextlib.suppress(NotFoundError):
            detach(a)
    for ifname in sorted({a.ifname for a in atts if a.created_clsact} - set(keep_clsact)):
        tc_destroy_clsact(ifname)


def teardown(pin_root: str, netns_name: str | None = None, keep_maps: bool = False) -> list[Attachment]:
    """Detach everything tuplet attached under pin_root and (unless keep_maps) unpin its maps."""
    st = state.load(pin_root)
    ns = netns_name or (st.netns if st else None)
    removed: list[Attachment] = []
    if ns and not netns.exists(ns):
        ns = None  # the namespace (and every device in it) is gone already
    with in_node_netns(ns):
        removed = list(st.attachments) if st else []
        _remove_attachments(removed)
    links_dir = Path(pin_root) / "links"
    if links_dir.exists():
        bpffs.remove_tree(links_dir)   # pinned links tuplet has no record of
    if not keep_maps:
        bpffs.remove_tree(pin_root)
    state.remove(pin_root, keep_services=keep_maps)
    log.info("torn down", pin_root=pin_root, attachments=len(removed), maps_removed=not keep_maps)
    return removed
