"""`tuplet ct top`: who fills the conntrack tables (tuplet.conntrack.top).

Entries held now, by source, destination address:port, service and endpoint (a streamed
walk of the tables); with ``--interval S``, new entries per second over S seconds too,
counted from the `ct events` ring (NEW records; needs the listener slot for that time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from typing import Any

import numpy as np

from tuplet.cli.common import pin_root_of
from tuplet.cli.ct_query import MAP_CHOICES, add_filter_flags, build_filter
from tuplet.conntrack import top
from tuplet.conntrack.notify import Listener
from tuplet.core.errors import ConfigError
from tuplet.datapath import abi, paths
from tuplet.lb.registry import Registry
from tuplet.node import state as statemod


def _names(root: str) -> tuple[dict[int, str], dict[bytes, str]]:
    """(rev-NAT index -> service name, endpoint address (top.addr16) -> endpoint name)."""
    try:
        reg = Registry.from_json(json.loads(paths.services_path(root).read_text(encoding="utf-8")))
        services = {v: k for k, v in reg.rev_nat.items()}
    except FileNotFoundError:
        services = {}
    st = statemod.load(root)
    eps = {top.addr16(a): e.name for e in (st.all_endpoints() if st else []) for a in e.addresses}
    return services, eps


def _print(title: str, t: top.Tally, n: int, services: dict[int, str], eps: dict[bytes, str],
           per: float = 1.0) -> None:
    print(title)
    for cat, rows in t.top(n).items():
        print(f"  {cat}:")
        if not rows:
            print("    (none)")
        for v, k in rows:
            share = f" ({k / t.total:.1%})" if t.total else ""
            amount = f"{k / per:,.1f}/s" if per != 1.0 else f"{k:,}"
            print(f"    {amount:>12}{share}  {top.label(cat, v, services, eps)}")
    err = max(c.error for c in t.by.values())
    if err:
        print(f"  (approximate: more than {top.CAP:,} distinct values; counts may be low by up to {err:,})")


def cmd_ct_top(args: argparse.Namespace) -> int:
    if args.top < 1 or args.interval < 0:
        raise ConfigError("ct top", "-n must be at least 1 and --interval at least 0")
    root = pin_root_of(args)
    flt = build_filter(args, root)
    services, eps = _names(root)
    ep_addrs = np.array(sorted(eps), top.ADDR)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with ExitStack() as stack:
        maps = [stack.enter_context(paths.open_pinned(root, n)) for n in MAP_CHOICES[args.map]
                if paths.is_pinned(root, n)]
        now = top.held(maps, flt, ep_addrs)
    took = time.perf_counter() - t0
    out["held"] = {**top.to_json(now, args.top, services, eps), "seconds": round(took, 3)}
    if args.output == "text":
        _print(f"entries held now: {now.total:,} in {len(maps)} tables (read in {took:.2f} s)",
               now, args.top, services, eps)
    if args.interval:
        new = top.Tally(ep_addrs)
        with Listener(root, flt, force=args.force) as lis:
            end = time.monotonic() + args.interval
            while (left := end - time.monotonic()) > 0:
                recs = lis.poll_raw(int(min(left, 0.1) * 1000))
                recs = recs[recs["type"] == abi.CT_NOTIFY_NEW]
                new.add(recs["tuple"], recs["entry"])
            lost = lis.lost()
        out["new_per_second"] = {**top.to_json(new, args.top, services, eps, args.interval),
                                 "interval": args.interval, "not_delivered": lost}
        if args.output == "text":
            _print(f"new entries per second over {args.interval:g} s: {new.total / args.interval:,.1f}/s"
                   f" ({lost} events not delivered)", new, args.top, services, eps, args.interval)
    if args.output == "json":
        json.dump(out, sys.stdout, indent=2)
        print()
    return 0


def add_parser(csub: Any) -> None:
    p = csub.add_parser("top", help="who fills the conntrack tables: top sources, destinations, services, "
                                    "endpoints by entries held (and new per second with --interval)")
    p.add_argument("-n", "--top", type=int, default=10, help="rows per category (default 10)")
    p.add_argument("--interval", type=float, default=0,
                   help="also count new entries over this many seconds (from ct events)")
    p.add_argument("--force", action="store_true", help="with --interval: take the events listener slot "
                   "from a listener that died")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    add_filter_flags(p)
    p.set_defaults(func=cmd_ct_top)
