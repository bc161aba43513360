"""`tuplet endpoint`: add, delete and list pods on a running datapath."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tuplet.cli.common import pin_root_of
from tuplet.core.errors import ConfigError
from tuplet.node import endpoints
from tuplet.node.state import EndpointRecord


def add_parser(sub: Any) -> None:
    e = sub.add_parser("endpoint", help="pods: add and remove them live, list them")
    esub = e.add_subparsers(dest="endpoint_command", required=True)
    a = esub.add_parser("add", help="attach the pod programs to a host-side veth and program the endpoint")
    a.add_argument("name")
    a.add_argument("--ifname", required=True, help="the pod's host-side interface")
    a.add_argument("--ipv4", default="", help="the pod's IPv4 address")
    a.add_argument("--ipv6", default="", help="the pod's IPv6 address (with or instead of --ipv4)")
    a.add_argument("--identity", default="0", help="security identity (SourceSecurityID), default 0")
    a.set_defaults(func=cmd_endpoint_add)
    d = esub.add_parser("delete", help="detach and remove a live endpoint, and flush its conntrack entries")
    d.add_argument("name")
    d.add_argument("-o", "--output", choices=["text", "json"], default="text")
    d.set_defaults(func=cmd_endpoint_delete)
    ls = esub.add_parser("list", help="endpoints from the node file and live ones")
    ls.add_argument("-o", "--output", choices=["text", "json"], default="text")
    ls.set_defaults(func=cmd_endpoint_list)


def _identity(v: str) -> int:
    try:
        return int(v, 0)
    except ValueError:
        raise ConfigError("--identity", f"must be an integer, got {v!r}") from None


def cmd_endpoint_add(args: argparse.Namespace) -> int:
    rec = EndpointRecord(args.name, args.ifname, args.ipv4, _identity(args.identity), source="cli", ipv6=args.ipv6)
    rec, recovered = endpoints.add(pin_root_of(args), rec)
    for r in recovered:
        print(r.describe())
    print(f"added endpoint {rec.name}: {rec.ifname} {' '.join(rec.addresses)} identity {rec.identity}")
    return 0


def cmd_endpoint_delete(args: argparse.Namespace) -> int:
    res = endpoints.delete(pin_root_of(args), args.name)
    if res is None:   # only with missing_ok
        return 0
    if args.output == "json":
        json.dump({"endpoint": res.record.to_json(), "flushed": res.flushed.to_json(),
                   "recovered": [r.describe() for r in res.recovered]}, sys.stdout, indent=2)
        print()
        return 0
    for r in res.recovered:
        print(r.describe())
    print(f"deleted endpoint {res.record.name} ({res.record.ifname} {' '.join(res.record.addresses)}): "
          f"flushed {res.flushed.describe()}")
    return 0


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    recs = endpoints.listing(root)
    in_map = endpoints.map_entries(root)
    if args.output == "json":
        json.dump([{**r.to_json(), "in_datapath": in_datapath(r, in_map)} for r in recs], sys.stdout, indent=2)
        print()
        return 0
    if not recs:
        print("no endpoints")
    for line in describe(recs, in_map):
        print(line)
    return 0


def describe(recs: list[EndpointRecord], in_map: dict[str, Any]) -> list[str]:
    """One line per endpoint, as `endpoint list` and `status` print them."""
    out = []
    for r in recs:
        extra = "" if in_datapath(r, in_map) else "  NOT IN DATAPATH"
        if r.phase != "ready":
            extra += f"  ({r.phase}, interrupted)"
        addrs = r.ipv4 or "-"
        if r.ipv6:
            addrs += f" {r.ipv6}"
        out.append(f"  {r.name:<20} {r.ifname:<16} {addrs:<16} identity {r.identity:<8} from {r.source}{extra}")
    return out


def in_datapath(r: EndpointRecord, in_map: dict[str, Any]) -> bool:
    """Every address of the endpoint is in its family's endpoint map."""
    return all(a in in_map for a in r.addresses)
