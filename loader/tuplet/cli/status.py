"""`tuplet status` and `tuplet metrics`: what is attached, how full the tables are, what
the agent did last, and the datapath's verdict counters."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from tuplet.agent.report import read_agent_state
from tuplet.cli.common import pin_root_of
from tuplet.cli.endpoint import describe as describe_endpoints
from tuplet.conntrack import sentinels
from tuplet.conntrack.schedule import EARLY_MIN_GAP, describe_settings
from tuplet.conntrack.sizing import Sizing
from tuplet.datapath import abi, cttables, metrics, paths
from tuplet.datapath import events as ct_events
from tuplet.datapath.cttables import Family
from tuplet.node import endpoints, socklb, state


def cmd_status(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    st = state.load(root)
    tables: list[dict[str, Any]] = []
    for name in (*cttables.NAMES, *cttables.NAT_NAMES):
        if not os.path.exists(os.path.join(root, name)):
            continue
        with paths.open_pinned(root, name) as m:
            tables.append({"map": name, "entries": sentinels.count_live(m), "max_entries": m.max_entries,
                           "family": cttables.family_of(name).value})
    atts = [a.to_json() for a in st.attachments] if st else []
    eps = endpoints.listing(root)
    sz = Sizing.from_json(st.sizing) if st and st.sizing else None
    gc_cfg = _gc_settings(st.gc if st else None)
    agent = read_agent_state(root)
    sock = socklb.describe(root, st.socket_lb_cgroup) if st else None
    verbose = bool(args.verbose or args.status_verbose)
    if args.output == "json":
        json.dump({"pin_root": root, "netns": st.netns if st else None, "attachments": atts,
                   "endpoints": [e.to_json() for e in eps],
                   "tables": tables, "sizing": sz.to_json() if sz else None, "gc": gc_cfg, "agent": agent,
                   "socket_lb": sock},
                  sys.stdout, indent=2)
        print()
        return 0
    print(f"Pin root:     {root}" + (f" (netns {st.netns})" if st and st.netns else ""))
    print(f"Agent:        {_describe_agent(agent)}")
    print("Attachments:")
    for a in atts:
        print(f"  {a['ifname']:<16} {a['hook']:<8} {a['program']:<20} {str(a['mode']).upper()}")
    if not atts:
        print("  none")
    if sock:
        print("\n".join(_describe_socket_lb(sock)))
    print("Endpoints:")
    print("\n".join(describe_endpoints(eps, endpoints.map_entries(root))) or "  none")
    print("Tables:")
    for t in tables:
        fill = 100.0 * int(t["entries"]) / int(t["max_entries"])
        print(f"  {t['map']:<16} {t['entries']:>9} / {t['max_entries']:<9} ({fill:.1f}%)")
    if sz and not verbose:
        print(f"BPF Maps:     {sz.summary()}")
    elif sz:
        print("\n".join(sz.describe(verbose=True)))
        print("    IPv6 tables: " + ", ".join(f"{n} as {cttables.sized_as(n)}" for n in
                                              (*cttables.NAMES, *cttables.NAT_NAMES) if cttables.family_of(n) is Family.IPV6))
    if verbose and gc_cfg:
        print(f"Conntrack GC: {describe_settings(gc_cfg['interval'], gc_cfg['max_interval'])}")
    last = (agent or {}).get("gc")
    if last:
        print(f"  last pass:  {time.time() - last['at']:.0f}s ago ({last['reason']}, {last['method']}): "
              f"{last['deleted']} deleted, {last['alive']} alive, {last['nat_deleted']} NAT deleted in "
              f"{last['duration_s'] * 1000:.1f} ms; {last['passes']} pass(es); next in {last['interval_s']:.0f}s")
    for line in _describe_pressure(agent):
        print(line)
    return 0


def _describe_pressure(agent: dict[str, Any] | None) -> list[str]:
    """The agent's view of table pressure: fill after its last GC pass, auto-grow, grows."""
    p = (agent or {}).get("pressure")
    if not p:
        return []
    fill = ", ".join(f"{name} {100 * ratio:.1f}%" for name, ratio in sorted(p.get("fill", {}).items()))
    hot = p.get("under_pressure") or []
    out = [f"Pressure:     fill after GC: {fill}" + (f"; under pressure: {', '.join(hot)}" if hot else "")]
    if p.get("auto_grow"):
        out.append(f"  auto-grow:  on, up to {p.get('auto_grow_max')} entries")
    else:
        out.append("  auto-grow:  off")
    for g in (agent or {}).get("grown", [])[-3:]:
        out.append(f"  grown:      {g['map']} {g['old_entries']} -> {g['new_entries']} "
                   f"({time.time() - g['at']:.0f}s ago, {100 * g['fill']:.0f}% full, {g['trigger']})")
    return out


def _describe_socket_lb(sock: dict[str, Any]) -> list[str]:
    """Socket LB: on (the cgroup, each program's link) or off, and a hint for missing links."""
    if not sock["configured"]:
        out = ["Socket LB:    off ([lb] socket_lb = false): ClusterIP load-balanced per packet"]
    else:
        out = [f"Socket LB:    on, cgroup {sock['cgroup']} (id {sock['cgroup_id']})"]
    for link in sock["links"]:
        out.append(f"  {link['program']:<22} {link['hook']:<12} link {link['link_id']} "
                   f"(program {link['prog_id']}, cgroup id {link['cgroup_id']})")
    if sock["missing"]:
        out.append(f"  MISSING:    {', '.join(sock['missing'])} not attached to the cgroup: connect()/"
                   "sendto() there go per packet; run `tuplet apply` again (README \"Socket LB\")")
    return out


def _describe_agent(agent: dict[str, Any] | None) -> str:
    if not agent:
        return "not running (the datapath works without it; GC and metrics need it)"
    out = f"running, pid {agent['pid']}, up {time.time() - agent['started']:.0f}s, config {agent['config']}"
    if agent.get("metrics"):
        out += f", metrics on {agent['metrics']}"
    rel = agent.get("last_reload")
    if rel:
        out += f"; last reload {'ok' if rel['ok'] else 'REJECTED: ' + rel.get('error', '')}"
    return out


def _gc_settings(recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """The GC settings ``apply`` recorded, with the mode spelled out (None: not recorded)."""
    if not recorded:
        return None
    interval = float(recorded.get("interval") or 0)
    cap = float(recorded.get("max_interval") or 0)
    return {"mode": "fixed" if interval else "adaptive", "interval": interval, "max_interval": cap,
            "early_min_gap": EARLY_MIN_GAP}


def cmd_metrics(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    obj = str(paths.object_dir() / abi.OBJ_LXC)
    names = metrics.reason_names(obj)
    with paths.open_pinned(root, abi.METRICS_MAP) as m:
        counters = metrics.read(m, names, metrics.direction_names(obj))
    counters.sort(key=lambda c: (c.direction, c.reason))
    events: dict[str, int] = {}
    if os.path.exists(f"{root}/{abi.EVENTS_MAP}"):   # absent on a datapath from before it
        with paths.open_pinned(root, abi.EVENTS_MAP) as m:
            events = ct_events.read(m, ct_events.event_names(obj))
    if args.output == "json":
        json.dump({"verdicts": [c.__dict__ for c in counters], "ct_events": events}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'DIRECTION':<14} {'REASON':<26} {'PACKETS':>10} {'BYTES':>12}")
    for c in counters:
        print(f"{c.direction:<14} {c.reason:<26} {c.packets:>10} {c.bytes:>12}")
    if events:
        print()
        print(f"{'CONNTRACK EVENT':<41} {'COUNT':>10}")
        for name, n in events.items():
            print(f"{name:<41} {n:>10}")
    return 0
