"""`tuplet ct events`: conntrack entries created and deleted, as they happen (conntrack -E).

NEW when the datapath creates an entry or promotes one out of the handshake table;
DESTROY when GC, a flush, an endpoint's removal or `ct delete` deletes one, with the
reason. The ct list filters apply. Records the datapath could not deliver (over its
per-CPU rate, or the ring full) are counted and reported on stderr as they grow and at
the end (tuplet.conntrack.notify).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from types import FrameType
from typing import Any

from tuplet.cli.common import pin_root_of
from tuplet.cli.ct_query import MAP_CHOICES, add_filter_flags, build_filter
from tuplet.conntrack.notify import DEFAULT_RATE, Listener
from tuplet.core.errors import ConfigError


def _stop(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_ct_events(args: argparse.Namespace) -> int:
    if args.rate < 1:
        raise ConfigError("--rate", f"must be at least 1, got {args.rate}")
    root = pin_root_of(args)
    flt = build_filter(args, root)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    tables = set(MAP_CHOICES[args.map])
    shown, reported = 0, 0
    signal.signal(signal.SIGTERM, _stop)
    with Listener(root, flt, rate=args.rate, force=args.force) as lis:
        print("listening (one listener per datapath); Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            while deadline is None or time.monotonic() < deadline:
                for kind, reason, rec, ktime in lis.poll(100):
                    if rec.map_name not in tables:
                        continue
                    if args.output == "json":
                        out: dict[str, Any] = {"event": kind, "reason": reason, "ktime_ns": ktime, **rec.to_json()}
                        print(json.dumps(out), flush=True)
                    else:
                        print(f"[{kind}] {rec.line()} reason={reason} map={rec.map_name}", flush=True)
                    shown += 1
                    if args.max_events and shown >= args.max_events:
                        raise KeyboardInterrupt
                lost = lis.lost()
                if lost > reported:
                    print(f"tuplet ct events: {lost} events not delivered so far "
                          "(over --rate per CPU, or the ring full)", file=sys.stderr, flush=True)
                    reported = lost
        except KeyboardInterrupt:
            pass
        lost = lis.lost()
    print(f"tuplet ct events: {shown} events shown, {lost} not delivered", file=sys.stderr, flush=True)
    return 0


def add_parser(csub: Any) -> None:
    ce = csub.add_parser("events", help="stream conntrack entries created and deleted (conntrack -E)")
    ce.add_argument("-o", "--output", choices=["text", "json"], default="text", help="json: one object per line")
    ce.add_argument("--rate", type=int, default=DEFAULT_RATE,
                    help=f"the datapath's events per CPU per second (default {DEFAULT_RATE}); the rest are counted")
    ce.add_argument("--timeout", type=float, default=0, help="stop after this many seconds (0: never)")
    ce.add_argument("--max-events", type=int, default=0, help="stop after this many events (0: never)")
    ce.add_argument("--force", action="store_true", help="attach although the flag says a listener is attached "
                    "(one that died without detaching)")
    add_filter_flags(ce)
    ce.set_defaults(func=cmd_ct_events)
