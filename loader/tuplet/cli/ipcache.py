"""`tuplet ipcache`: identities of remote pods by IPv4 or IPv6 prefix."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tuplet.cli.common import pin_root_of
from tuplet.node import ipcache


def add_parser(sub: Any) -> None:
    c = sub.add_parser("ipcache", help="remote identities: IPv4 or IPv6 prefix -> identity (SourceSecurityID)")
    csub = c.add_subparsers(dest="ipcache_command", required=True)
    a = csub.add_parser("add", help="set the identity of a prefix (replaces an existing one)")
    a.add_argument("prefix", help="e.g. 10.65.0.0/24 or f00d:1::/64 (a bare address is a /32 or /128)")
    a.add_argument("--identity", required=True)
    a.set_defaults(func=cmd_ipcache_add)
    d = csub.add_parser("delete", help="remove a prefix")
    d.add_argument("prefix")
    d.set_defaults(func=cmd_ipcache_delete)
    ls = csub.add_parser("list", help="every prefix with its identity and where it came from")
    ls.add_argument("-o", "--output", choices=["text", "json"], default="text")
    ls.set_defaults(func=cmd_ipcache_list)


def cmd_ipcache_add(args: argparse.Namespace) -> int:
    e = ipcache.add(pin_root_of(args), args.prefix, args.identity)
    print(f"ipcache {e.prefix} -> identity {e.identity}")
    return 0


def cmd_ipcache_delete(args: argparse.Namespace) -> int:
    ipcache.delete(pin_root_of(args), args.prefix)
    print(f"ipcache {args.prefix} deleted")
    return 0


def cmd_ipcache_list(args: argparse.Namespace) -> int:
    entries = ipcache.listing(pin_root_of(args))
    if args.output == "json":
        json.dump([e.to_json() for e in entries], sys.stdout, indent=2)
        print()
        return 0
    if not entries:
        print("no ipcache entries")
    for e in entries:
        print(f"{e.prefix:<20} identity {e.identity:<10} from {e.source}")
    return 0
