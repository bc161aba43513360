"""`tuplet svc`: add, change, delete and list services on a running datapath."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from tuplet.cli.common import pin_root_of
from tuplet.core import hostport
from tuplet.core.errors import ConfigError
from tuplet.lb import writer as lb
from tuplet.lb.model import (
    Backend,
    Service,
    ServiceType,
    ServiceView,
    check_address,
    check_affinity,
    check_maglev_size,
    check_name,
    check_port,
    check_service,
    dual_stack_peers,
    listing_order,
    parse_backend,
    protocol,
    service_type,
)
from tuplet.node import socklb
from tuplet.node.lock import node_lock


def add_parser(sub: Any) -> None:
    s = sub.add_parser("svc", help="services: ClusterIP, NodePort, LoadBalancer")
    ssub = s.add_subparsers(dest="svc_command", required=True)

    backend_help = "ADDRESS:PORT[,weight=N][,node=ADDRESS], IPv6 as [ADDRESS]:PORT (repeat for more backends)"
    a = ssub.add_parser("add", help="add a service")
    a.add_argument("name")
    a.add_argument("--type", default="ClusterIP", choices=[t.value for t in ServiceType])
    a.add_argument("--address", required=True, help="ClusterIP, LoadBalancer VIP, or the node address (NodePort)")
    a.add_argument("--port", required=True)
    a.add_argument("--protocol", default="tcp", choices=["tcp", "udp"])
    a.add_argument("--backend", action="append", default=[], help=backend_help)
    a.add_argument("--affinity-timeout", default=None, help="client-IP session affinity, e.g. 3h (0: off)")
    a.add_argument("--maglev-size", default=None, help="Maglev table entries, prime (default: the node's)")
    a.add_argument("-o", "--output", choices=["text", "json"], default="text")
    a.set_defaults(func=cmd_svc_add)

    u = ssub.add_parser("update", help="change a service's backends or settings (atomically)")
    u.add_argument("name")
    u.add_argument("--backend", action="append", default=None, help="replace all backends: " + backend_help)
    u.add_argument("--add-backend", action="append", default=[], help="add (or change) a backend")
    u.add_argument("--remove-backend", action="append", default=[],
                   help="remove the backend ADDRESS:PORT ([ADDRESS]:PORT for IPv6)")
    u.add_argument("--affinity-timeout", default=None)
    u.add_argument("--maglev-size", default=None)
    u.add_argument("-o", "--output", choices=["text", "json"], default="text")
    u.set_defaults(func=cmd_svc_update)

    d = ssub.add_parser("delete", help="delete a service")
    d.add_argument("name")
    d.set_defaults(func=cmd_svc_delete)

    ls = ssub.add_parser("list", help="services, backends and their Maglev table share")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--family", choices=["ipv4", "ipv6"], help="only services of this address family")
    ls.add_argument("--address", help="only services at this frontend: ADDRESS, ADDRESS:PORT, [IPV6] or [IPV6]:PORT")
    ls.add_argument("-o", "--output", choices=["text", "json"], default="text")
    ls.set_defaults(func=cmd_svc_list)


def _backends(values: list[str], flag: str) -> tuple[Backend, ...]:
    return tuple(parse_backend(v, f"{flag} {v}") for v in values)


def cmd_svc_add(args: argparse.Namespace) -> int:
    s = check_service(Service(
        name=check_name(args.name, "name"),
        type=service_type(args.type, "--type"),
        address=check_address(args.address, "--address"),
        port=check_port(args.port, "--port"),
        protocol=protocol(args.protocol, "--protocol"),
        backends=_backends(args.backend, "--backend"),
        affinity_timeout=check_affinity(args.affinity_timeout, "--affinity-timeout")
        if args.affinity_timeout is not None else 0,
        maglev_size=check_maglev_size(args.maglev_size, "--maglev-size") if args.maglev_size is not None else None,
        source="cli"), "--backend")
    root = pin_root_of(args)
    with node_lock(root), lb.ServiceTable(root) as table:
        if s.name in table.reg.services:
            raise ConfigError("name", f"service {s.name!r} exists already (use `tuplet svc update`)")
        view = table.upsert(s)
    _show(args, [view])
    return 0


def cmd_svc_update(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    with node_lock(root), lb.ServiceTable(root) as table:
        old = table.get(args.name)
        backends = list(_backends(args.backend, "--backend")) if args.backend is not None else list(old.backends)
        for b in _backends(args.add_backend, "--add-backend"):
            backends = [x for x in backends if x.endpoint != b.endpoint] + [b]
        for v in args.remove_backend:
            gone = parse_backend(v, f"--remove-backend {v}")
            if not any(x.endpoint == gone.endpoint for x in backends):
                raise ConfigError(f"--remove-backend {v}", f"service {old.name!r} has no backend {gone.endpoint}")
            backends = [x for x in backends if x.endpoint != gone.endpoint]
        new = replace(old, backends=tuple(backends))
        if args.affinity_timeout is not None:
            new = replace(new, affinity_timeout=check_affinity(args.affinity_timeout, "--affinity-timeout"))
        if args.maglev_size is not None:
            new = replace(new, maglev_size=check_maglev_size(args.maglev_size, "--maglev-size"))
        view = table.upsert(check_service(new, "--backend"))
        socklb.after_service_change(root)
    _show(args, [view])
    return 0


def cmd_svc_delete(args: argparse.Namespace) -> int:
    root = pin_root_of(args)
    with node_lock(root), lb.ServiceTable(root) as table:
        table.delete(args.name)
        socklb.after_service_change(root)
    print(f"deleted service {args.name}")
    return 0


def cmd_svc_list(args: argparse.Namespace) -> int:
    want = hostport.parse(args.address, "--address") if args.address else None
    with lb.ServiceTable(pin_root_of(args)) as table:
        if args.name:
            table.get(args.name)                 # an unknown name is an error, not an empty list
        peers = dual_stack_peers(table.reg.services.values())
        chosen = [s for s in listing_order(table.reg.services.values())
                  if (not args.name or s.name == args.name)
                  and (not args.family or f"ipv{s.family}" == args.family)
                  and (want is None or (s.address == want[0] and want[1] in (None, s.port)))]
        views = [table.view(s.name) for s in chosen]
        draining = table.draining()
    if args.output == "json":
        json.dump({"services": [v.to_json(peers.get(v.service.name)) for v in views],
                   "draining_backends": draining}, sys.stdout, indent=2)
        print()
        return 0
    _show(args, views, peers)
    if draining:
        print(f"draining backends (removed, still used by established flows): {', '.join(sorted(draining))}")
    return 0


def _show(args: argparse.Namespace, views: list[ServiceView], peers: dict[str, str] | None = None) -> None:
    peers = peers or {}
    if getattr(args, "output", "text") == "json":
        json.dump({"services": [v.to_json(peers.get(v.service.name)) for v in views]}, sys.stdout, indent=2)
        print()
        return
    if not views:
        print("no services")
    front_w = max([24, *(len(v.service.describe_frontend()) for v in views)])
    back_w = max([22, *(len(b.backend.endpoint) for v in views for b in v.backends)])
    for v in views:
        s = v.service
        extra = [f"rev-nat {v.rev_nat}", f"maglev {v.maglev_size}" if v.maglev_size else "no backends"]
        if s.affinity_timeout:
            extra.append(f"affinity {s.affinity_timeout}s")
        if s.name in peers:
            extra.append(f"dual-stack with {peers[s.name]}")
        if not v.live:
            extra.append("NOT IN DATAPATH")
        print(f"{s.name:<20} {s.type.value:<13} {s.describe_frontend():<{front_w}} ({', '.join(extra)}; from {s.source})")
        for b in v.backends:
            where = f"remote via {b.backend.node}" if b.remote and b.backend.node else \
                "remote" if b.remote else "local"
            w = " draining (weight 0)" if b.backend.weight == 0 else \
                f" weight {b.backend.weight}" if b.backend.weight != 1 else ""
            print(f"  {b.backend.endpoint:<{back_w}} id {b.id:<6} {100.0 * v.share(b):6.2f}% ({b.slots} slots) "
                  f"{where}{w}")
