"""`tuplet ct list` and `tuplet ct delete` with conntrack-tools' filters (-L and -D).

Both stream: a table is read a chunk at a time, filtered with numpy and printed (or
deleted) before the next chunk is read, so memory stays bounded on any table size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np

from tuplet.cli.common import pin_root_of
from tuplet.conntrack import ctfilter, listing
from tuplet.conntrack.ctfilter import CtFilter, FilterLayout
from tuplet.conntrack.flush import Flusher
from tuplet.conntrack.notify import emitter_for
from tuplet.core.errors import ConfigError
from tuplet.datapath import abi, clock, cttables, paths
from tuplet.datapath.cttables import Family, Proto
from tuplet.lb.registry import Registry
from tuplet.node import state as statemod

MAP_CHOICES = {"all": list(cttables.NAMES), "tcp": list(cttables.names(protos=(Proto.TCP, Proto.SYN))),
               "any": list(cttables.names(protos=(Proto.ANY,))),
               **{f.value: list(cttables.names(f)) for f in Family}}


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (as conntrack's; all given must match)")
    g.add_argument("-s", "--src", "--orig-src", dest="src", help="original source address or prefix (IPv4 or IPv6)")
    g.add_argument("-d", "--dst", "--orig-dst", dest="dst", help="original destination address or prefix")
    g.add_argument("-p", "--proto", help="tcp, udp, icmp, icmpv6 or a number")
    g.add_argument("--sport", "--orig-port-src", dest="sport", help="original source port")
    g.add_argument("--dport", "--orig-port-dst", dest="dport", help="original destination port")
    g.add_argument("--type", dest="ct_type", help="OUT (a pod sent), IN (a pod received) or SVC (service flow)")
    g.add_argument("--state", help="syn, established or closing (TCP entries)")
    g.add_argument("--endpoint", help="entries with this endpoint's address on either side")
    g.add_argument("--service", help="entries of this service's flows (its rev-NAT index)")
    p.add_argument("--map", choices=list(MAP_CHOICES), default="all",
                   help="which tables (tcp: established and handshake)")


#: CtFilter field, the argparse attribute, its flag, and the parser that names the flag on a bad value.
_PARSED: tuple[tuple[str, str, str, Callable[[str, str], Any]], ...] = (
    ("src", "src", "--src", ctfilter.parse_net), ("dst", "dst", "--dst", ctfilter.parse_net),
    ("proto", "proto", "--proto", ctfilter.parse_proto), ("sport", "sport", "--sport", ctfilter.parse_port),
    ("dport", "dport", "--dport", ctfilter.parse_port), ("type", "ct_type", "--type", ctfilter.parse_type),
    ("state", "state", "--state", ctfilter.parse_state),
)


def build_filter(args: argparse.Namespace, root: str) -> CtFilter:
    """The filter of the command line; a bad value is a ConfigError naming its flag."""
    kw: dict[str, Any] = {}
    for field, attr, flag, parse in _PARSED:
        value = getattr(args, attr)
        if value is not None:
            kw[field] = parse(flag, value)
    if args.endpoint is not None:
        kw["addrs"] = _endpoint_addrs(root, args.endpoint)
    if args.service is not None:
        kw["rev_nat"] = _service_rev_nat(root, args.service)
    return CtFilter(**kw)


def _endpoint_addrs(root: str, name: str) -> tuple[str, ...]:
    st = statemod.load(root)
    eps = st.all_endpoints() if st else []
    for e in eps:
        if e.name == name:
            return e.addresses
    known = ", ".join(sorted(e.name for e in eps)) or "none"
    raise ConfigError("--endpoint", f"no endpoint named {name!r} on this node (known: {known})")


def _service_rev_nat(root: str, name: str) -> int:
    try:
        reg = Registry.from_json(json.loads(paths.services_path(root).read_text(encoding="utf-8")))
    except FileNotFoundError:
        reg = Registry()
    if name not in reg.rev_nat:
        known = ", ".join(sorted(reg.rev_nat)) or "none"
        raise ConfigError("--service", f"no service named {name!r} (known: {known})")
    return reg.rev_nat[name]


def _present(root: str, names: list[str]) -> list[str]:
    return [n for n in names if os.path.exists(os.path.join(root, n))]


def cmd_ct_list(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    flt = build_filter(args, root)
    want_now = args.time_diff or args.output == "extended"
    now = clock.monotonic_now() if want_now else None
    out = sys.stdout
    total = 0
    first = True
    if args.output == "json" and not args.count:
        out.write("[")
    for name in _present(root, MAP_CHOICES[args.map]):
        with paths.open_pinned(root, name) as m:
            for chunk in listing.matching(m, flt):
                total += len(chunk)
                if args.count:
                    continue
                for r in chunk.records():
                    if args.output == "json":
                        out.write(("\n  " if first else ",\n  ") + json.dumps(r.to_json(now)))
                        first = False
                    elif args.output == "extended":
                        out.write(listing.extended_line(r, now or 0) + "\n")
                    else:
                        out.write(r.line(now) + "\n")
    if args.count:
        print(total)
    elif args.output == "json":
        out.write("\n]\n" if not first else "]\n")
    else:
        print(f"tuplet: {total} flow entries have been shown.", file=sys.stderr)
    return 0


def cmd_ct_delete(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    flt = build_filter(args, root)
    if flt.empty and not args.all:
        raise ConfigError("ct delete", "refusing to delete every entry without a filter: give a filter "
                          "(-s, -d, -p, --sport, --dport, --type, --state, --endpoint, --service) or --all")
    names = _present(root, MAP_CHOICES[args.map])
    with ExitStack() as stack:
        maps = [stack.enter_context(paths.open_pinned(root, n)) for n in names]
        maps = [m for m in maps if not listing.skip_map(m.name, flt)]
        nat = paths.open_present(root, cttables.NAT_NAMES, stack)
        layouts = {m.name: FilterLayout.of(m) for m in maps}

        def match(name: str, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
            return flt.mask(layouts[name], keys, values)

        notify = emitter_for(root, stack, paths.object_dir() / abi.OBJ_GC)
        res = Flusher(maps, nat=nat, notify=notify, reason=abi.CT_NOTIFY_R_DELETE).flush_matching(
            match, what=_describe(args))
    if args.output == "json":
        json.dump(res.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(f"deleted {res.describe()}")
    return 0


def _describe(args: argparse.Namespace) -> str:
    parts = [f"{k}={v}" for k, v in (("src", args.src), ("dst", args.dst), ("proto", args.proto),
                                     ("sport", args.sport), ("dport", args.dport), ("type", args.ct_type),
                                     ("state", args.state), ("endpoint", args.endpoint),
                                     ("service", args.service)) if v is not None]
    return " ".join(parts) or "all"


def add_parsers(csub: Any) -> None:
    cl = csub.add_parser("list", help="print the conntrack entries (conntrack -L), filtered")
    cl.add_argument("--time-diff", action="store_true", help="also print the seconds until each entry expires")
    cl.add_argument("-o", "--output", choices=["text", "json", "extended"], default="text",
                    help="extended: /proc/net/nf_conntrack lines")
    cl.add_argument("-c", "--count", action="store_true", help="print only the number of matching entries")
    add_filter_flags(cl)
    cl.set_defaults(func=cmd_ct_list)
    cd = csub.add_parser("delete", help="delete the matching conntrack entries and the NAT entries they own "
                                        "(conntrack -D)")
    cd.add_argument("--all", action="store_true", help="allow an empty filter (every entry)")
    cd.add_argument("-o", "--output", choices=["text", "json"], default="text")
    add_filter_flags(cd)
    cd.set_defaults(func=cmd_ct_delete)
