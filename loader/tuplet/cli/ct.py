"""`tuplet ct`: collect and flush the conntrack tables (list and delete: ct_query.py)."""
from __future__ import annotations

import argparse
import json
import os
import signal as sig
import sys
import threading
from contextlib import ExitStack

from tuplet.agent.report import read_agent_state
from tuplet.cli.common import pin_root_of
from tuplet.conntrack import notify
from tuplet.conntrack import stats as ctstats
from tuplet.conntrack.flush import flush_pinned
from tuplet.conntrack.gc import CtGc
from tuplet.conntrack.runner import GcRunner, PassReport
from tuplet.conntrack.schedule import GcSchedule
from tuplet.core.errors import NotFoundError
from tuplet.datapath import abi, cttables, enums, paths
from tuplet.datapath.abi import SIGNAL_MAP
from tuplet.datapath.signals import SignalReader
from tuplet.node import config as configmod
from tuplet.node import options


def cmd_ct_gc(args: argparse.Namespace) -> int:

    root = pin_root_of(args)
    with ExitStack() as stack:
        maps = paths.open_present(root, cttables.NAMES, stack)
        nat = paths.open_present(root, cttables.NAT_NAMES, stack)
        collector = stack.enter_context(CtGc(maps, nat=nat, method=args.method,
                                             notify_maps=notify.open_maps(root, stack)))
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


def _gc_follow(args: argparse.Namespace, root: str, collector: CtGc, stack: ExitStack) -> int:

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
    res = flush_pinned(pin_root_of(args))
    print(f"flushed {res.describe()} in {res.duration_s * 1000:.0f} ms, {res.chunks} chunk(s), "
          f"longest system call {res.longest_step_s * 1000:.2f} ms")
    return 0


def cmd_ct_stats(args: argparse.Namespace) -> int:
    """Per-CPU counters like `conntrack -S`, the total, drops by reason, evictions (agent)."""
    root = pin_root_of(args)
    obj = str(paths.object_dir() / abi.OBJ_LXC)
    with ExitStack() as stack:
        mm = (stack.enter_context(paths.open_pinned(root, abi.METRICS_MAP))
              if os.path.exists(os.path.join(root, abi.METRICS_MAP)) else None)
        em = (stack.enter_context(paths.open_pinned(root, abi.EVENTS_MAP))
              if os.path.exists(os.path.join(root, abi.EVENTS_MAP)) else None)
        if mm is None and em is None:
            raise NotFoundError(f"pin root {root}", "ct stats", detail="no datapath counters pinned "
                                "(tpl_metrics_v2, tpl_ct_events_v2): is the datapath applied?")
        reasons = enums.map_names(mm, enums.REASONS, obj) if mm else {}
        evnames = enums.map_names(em, enums.CT_EVENTS, obj) if em else {}
        cpus, total = ctstats.collect(mm, reasons, em, evnames)
    agent = read_agent_state(root)
    evicted = agent.get("evicted") if agent else None
    if args.output == "json":
        json.dump({"cpus": [c.to_json() for c in cpus], "total": total.to_json(),
                   "evicted_estimate": evicted, "no_counterpart": list(ctstats.NO_COUNTERPART)},
                  sys.stdout, indent=2)
        print()
        return 0
    for c in cpus:
        print(c.line())
    print(total.line())
    for reason, n in sorted(total.drops.items()):
        print(f"drop {reason}={n}")
    if evicted is None:
        print("evicted: no estimate (the agent is not running; it estimates LRU evictions per GC pass)")
    else:
        print("evicted (estimate since the agent's GC loop started): "
              + (" ".join(f"{k}={v}" for k, v in sorted(evicted.items())) or "none"))
    return 0
