"""The `tuplet` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from tuplet.agent import log as logmod
from tuplet.bpf.bpffs import DEFAULT_PIN_ROOT
from tuplet.cli import svc as cli_svc
from tuplet.conntrack import records as ct
from tuplet.conntrack.schedule import EARLY_MIN_GAP, describe_settings
from tuplet.conntrack.sizing import Sizing
from tuplet.datapath import abi, clock, metrics, paths
from tuplet.datapath import events as ct_events
from tuplet.node import apply as node_apply
from tuplet.node import config as configmod
from tuplet.node import options, state

if TYPE_CHECKING:
    from contextlib import ExitStack

    from tuplet.conntrack.gc import CtGc
from tuplet.bpf.links import AttachMode
from tuplet.core.errors import ConfigError, TupletError, VerifierError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logmod.configure(args.log_level or ("info" if args.command == "agent" else "warning"), args.log_format)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"tuplet: {e}", file=sys.stderr)
        return 2
    except VerifierError as e:
        print(f"tuplet: {e}", file=sys.stderr)
        if args.verbose:
            print(e.log, file=sys.stderr)
        else:
            print("(the whole verifier log: run again with --verbose)", file=sys.stderr)
        return 1
    except TupletError as e:
        print(f"tuplet: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuplet", description="eBPF connection tracking datapath for Linux nodes")
    p.add_argument("--pin-root", default=None, help=f"bpffs directory of the datapath (default {DEFAULT_PIN_ROOT}, "
                   "or node.pin_root of --config)")
    p.add_argument("--config", "-c", default=None, help="node configuration file (TOML)")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="default: info for `agent`, warning otherwise")
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    p.add_argument("--verbose", "-v", action="store_true", help="more detail (whole verifier logs, derivations)")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("apply", help="load and attach the datapath as a configuration file says")
    a.add_argument("file", help="node configuration file (TOML)")
    a.add_argument("--attach-mode", choices=[m.value for m in AttachMode], default=None,
                   help="override node.attach_mode (tc forces the legacy TC fallback)")
    a.add_argument("--netns", default=None, help="override node.netns")
    options.add_flags(a)
    a.set_defaults(func=cmd_apply)

    ag = sub.add_parser("agent", help="run the node agent (systemd service): apply, GC, metrics, reload on SIGHUP")
    ag.add_argument("--prometheus-serve-addr", default=None,
                    help="address of the metrics endpoint (default :9962; empty disables)")
    options.add_flags(ag)
    ag.set_defaults(func=cmd_agent)

    t = sub.add_parser("teardown", help="detach the datapath and remove its pins")
    t.add_argument("--keep-maps", action="store_true", help="keep the pinned maps (conntrack state)")
    t.add_argument("--netns", default=None, help="network namespace of the node's devices")
    t.set_defaults(func=cmd_teardown)

    c = sub.add_parser("ct", help="conntrack tables")
    csub = c.add_subparsers(dest="ct_command", required=True)
    cl = csub.add_parser("list", help="print every conntrack entry")
    cl.add_argument("--time-diff", action="store_true", help="also print the seconds until each entry expires")
    cl.add_argument("-o", "--output", choices=["text", "json"], default="text")
    cl.add_argument("--map", choices=["all", "tcp", "any"], default="all", help="which table")
    cl.set_defaults(func=cmd_ct_list)
    cg = csub.add_parser("gc", help="run one garbage-collection pass and print what it did")
    cg.add_argument("-o", "--output", choices=["text", "json"], default="text")
    cg.add_argument("--method", choices=["auto", "kernel", "batch"], default="auto",
                    help="kernel: a BPF program walks and deletes in place; batch: batch syscalls "
                         "from user space (auto: kernel when the kernel accepts it)")
    cg.add_argument("--follow", action="store_true",
                    help="keep running passes on the schedule, and early when the datapath reports "
                         "a failed insert, until interrupted")
    options.add_flags(cg, options.GC_FLAG_KEYS)
    cg.set_defaults(func=cmd_ct_gc)
    cf = csub.add_parser("flush", help="delete every conntrack entry")
    cf.set_defaults(func=cmd_ct_flush)

    s = sub.add_parser("status", help="attachments and tables")
    s.add_argument("-o", "--output", choices=["text", "json"], default="text")
    s.add_argument("--verbose", "-v", dest="status_verbose", action="store_true",
                   help="also how each map size was derived, and the GC settings")
    s.set_defaults(func=cmd_status)

    cli_svc.add_parser(sub)

    m = sub.add_parser("metrics", help="datapath verdicts and drop reasons")
    m.add_argument("-o", "--output", choices=["text", "json"], default="text")
    m.set_defaults(func=cmd_metrics)
    return p


def pin_root_of(args: argparse.Namespace) -> str:
    """--pin-root, else node.pin_root of --config, else the default."""
    if args.pin_root:
        return str(args.pin_root)
    if args.config:
        return configmod.load(args.config).pin_root
    return DEFAULT_PIN_ROOT


def cmd_apply(args: argparse.Namespace) -> int:
    cfg = options.merge_flags(configmod.load(args.file), args)
    changes = {}
    if args.attach_mode:
        changes["attach_mode"] = AttachMode(args.attach_mode)
    if args.netns:
        changes["netns"] = args.netns
    if args.pin_root:
        changes["pin_root"] = args.pin_root
    if changes:
        import dataclasses
        cfg = dataclasses.replace(cfg, **changes)
    res = node_apply.apply(cfg)
    modes = ", ".join(sorted({a.mode.value for a in res.attachments})) or "none"
    print(f"applied {cfg.source}: {res.endpoints} endpoint(s), {len(res.attachments)} attachment(s) "
          f"({modes}), pins under {cfg.pin_root}" + (" (reused)" if res.reused_pins else ""))
    for r in res.resized:
        print(f"resized {r.map}: {r.old_entries} -> {r.new_entries} entries, {r.copied} copied, "
              f"{r.dropped} dropped")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from tuplet.agent import prom
    from tuplet.agent import service as agent

    path = args.config or agent.DEFAULT_CONFIG
    addr = agent.DEFAULT_PROM_ADDR if args.prometheus_serve_addr is None else args.prometheus_serve_addr
    prom.parse_addr(addr)   # a bad address fails before anything changes

    def overrides(cfg: configmod.NodeConfig) -> configmod.NodeConfig:
        cfg = options.merge_flags(cfg, args)
        if args.pin_root:
            import dataclasses
            cfg = dataclasses.replace(cfg, pin_root=args.pin_root)
        return cfg

    return agent.run_agent(path, overrides, addr)


def cmd_teardown(args: argparse.Namespace) -> int:
    removed = node_apply.teardown(pin_root_of(args), args.netns, keep_maps=args.keep_maps)
    print(f"detached {len(removed)} attachment(s)" + ("" if args.keep_maps else "; maps unpinned"))
    return 0


def _ct_maps(args: argparse.Namespace) -> list[str]:
    return {"all": list(abi.CT_MAPS), "tcp": [abi.CT_MAP_TCP], "any": [abi.CT_MAP_ANY]}[args.map]


def cmd_ct_list(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    now = clock.monotonic_now() if args.time_diff else None
    recs = []
    for name in _ct_maps(args):
        with paths.open_pinned(root, name) as m:
            recs.extend(ct.records(m))
    recs.sort(key=ct.sort_key)
    if args.output == "json":
        json.dump([r.to_json(now) for r in recs], sys.stdout, indent=2)
        print()
    else:
        for r in recs:
            print(r.line(now))
    return 0


def cmd_ct_gc(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from tuplet.conntrack.gc import CtGc

    root = pin_root_of(args)
    with ExitStack() as stack:
        maps = [stack.enter_context(paths.open_pinned(root, n)) for n in abi.CT_MAPS]
        nat = (stack.enter_context(paths.open_pinned(root, abi.NAT_MAP))
               if os.path.exists(os.path.join(root, abi.NAT_MAP)) else None)
        collector = stack.enter_context(CtGc(maps, nat=nat, method=args.method))
        if args.follow:
            return _gc_follow(args, root, collector, stack)
        res = collector.run()
    if args.output == "json":
        json.dump(res.to_json(), sys.stdout, indent=2)
        print()
        return 0
    for m in res.maps:
        print(f"{m.map:<16} alive={m.alive} deleted={m.deleted} nat_deleted={m.nat_deleted} "
              f"kept_refreshed={m.kept_refreshed} max_entries={m.max_entries} "
              f"in {m.duration * 1000:.1f} ms")
    print(f"gc pass ({res.method}): {res.deleted} deleted, {res.nat_deleted} NAT entries deleted, "
          f"{res.alive} alive in {res.duration * 1000:.1f} ms")
    return 0


def _gc_follow(args: argparse.Namespace, root: str, collector: "CtGc", stack: "ExitStack") -> int:
    import signal as sig
    import threading

    from tuplet.conntrack.runner import GcRunner, PassReport
    from tuplet.conntrack.schedule import GcSchedule
    from tuplet.datapath.abi import SIGNAL_MAP
    from tuplet.datapath.signals import SignalReader

    cfg = configmod.load(args.config) if args.config else configmod.NodeConfig()
    ct_cfg = options.merge_flags(cfg, args).conntrack
    reader = None
    if os.path.exists(os.path.join(root, SIGNAL_MAP)):
        ring = stack.enter_context(paths.open_pinned(root, SIGNAL_MAP))
        reader = stack.enter_context(SignalReader(ring, str(paths.object_dir() / abi.OBJ_LXC)))
    schedule = GcSchedule(fixed=ct_cfg.gc_interval, maximum=ct_cfg.gc_max_interval)

    def show(rep: PassReport) -> None:
        r = rep.result
        print(f"gc pass ({rep.reason}, {r.method}): {r.deleted} deleted, {r.nat_deleted} NAT, "
              f"{r.alive} alive in {r.duration * 1000:.1f} ms; delete ratio {rep.ratio:.4f}, "
              f"next in {rep.interval:g}s", flush=True)

    stop = threading.Event()
    for s in (sig.SIGINT, sig.SIGTERM):
        sig.signal(s, lambda *_: stop.set())
    runner = GcRunner(collector, schedule, signals=reader, on_pass=show)
    print(f"gc: {schedule.describe()}; early passes on datapath signals: "
          f"{'on' if reader else 'off (no signal ring pinned)'}", flush=True)
    runner.run_pass("start")
    runner.serve(stop)
    print(f"gc: stopped after {runner.passes} pass(es)")
    return 0


def cmd_ct_flush(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    total = 0
    for name in abi.CT_MAPS:
        with paths.open_pinned(root, name) as m:
            total += m.clear()
    nat = 0
    if os.path.exists(os.path.join(root, abi.NAT_MAP)):
        with paths.open_pinned(root, abi.NAT_MAP) as m:
            nat = m.clear()
    print(f"flushed {total} conntrack entries and {nat} NAT entries")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    st = state.load(root)
    tables = []
    for name in (*abi.CT_MAPS, abi.NAT_MAP):
        if not os.path.exists(os.path.join(root, name)):
            continue
        with paths.open_pinned(root, name) as m:
            tables.append({"map": name, "entries": m.count(), "max_entries": m.max_entries})
    atts = [a.to_json() for a in st.attachments] if st else []
    sz = Sizing.from_json(st.sizing) if st and st.sizing else None
    gc_cfg = _gc_settings(st.gc if st else None)
    from tuplet.agent.service import read_agent_state

    agent = read_agent_state(root)
    verbose = bool(args.verbose or args.status_verbose)
    if args.output == "json":
        json.dump({"pin_root": root, "netns": st.netns if st else None, "attachments": atts,
                   "tables": tables, "sizing": sz.to_json() if sz else None, "gc": gc_cfg, "agent": agent},
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
    print("Tables:")
    for t in tables:
        fill = 100.0 * t["entries"] / t["max_entries"]
        print(f"  {t['map']:<16} {t['entries']:>9} / {t['max_entries']:<9} ({fill:.1f}%)")
    if sz and not verbose:
        print(f"BPF Maps:     {sz.summary()}")
    elif sz:
        print("\n".join(sz.describe(verbose=True)))
    if verbose and gc_cfg:
        print(f"Conntrack GC: {describe_settings(gc_cfg['interval'], gc_cfg['max_interval'])}")
    last = (agent or {}).get("gc")
    if last:
        import time

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
    import time

    for g in (agent or {}).get("grown", [])[-3:]:
        out.append(f"  grown:      {g['map']} {g['old_entries']} -> {g['new_entries']} "
                   f"({time.time() - g['at']:.0f}s ago, {100 * g['fill']:.0f}% full, {g['trigger']})")
    return out


def _describe_agent(agent: dict[str, Any] | None) -> str:
    if not agent:
        return "not running (the datapath works without it; GC and metrics need it)"
    import time

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


if __name__ == "__main__":
    sys.exit(main())
