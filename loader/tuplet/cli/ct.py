"""`tuplet ct`: collect and flush the conntrack tables (list and delete: ct_query.py)."""
from __future__ import annotations

import argparse
import json
import os
import signal as sig
import sys
import threading
from contextlib import ExitStack

from tuplet.cli.common import pin_root_of
from tuplet.conntrack.gc import CtGc
from tuplet.conntrack.runner import GcRunner, PassReport
from tuplet.conntrack.schedule import GcSchedule
from tuplet.datapath import abi, paths
from tuplet.datapath.abi import SIGNAL_MAP
from tuplet.datapath.signals import SignalReader
from tuplet.node import config as configmod
from tuplet.node import options


def cmd_ct_gc(args: argparse.Namespace) -> int:

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
