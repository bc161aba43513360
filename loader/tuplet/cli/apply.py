"""`tuplet apply`, `tuplet agent` and `tuplet teardown`: the node's datapath as a whole."""
from __future__ import annotations

import argparse
import dataclasses

from tuplet.agent import http
from tuplet.agent import service as agent
from tuplet.bpf.links import AttachMode
from tuplet.cli.common import pin_root_of
from tuplet.node import apply as node_apply
from tuplet.node import config as configmod
from tuplet.node import options


def cmd_apply(args: argparse.Namespace) -> int:
    cfg = options.merge_flags(configmod.load(args.file), args)
    if args.attach_mode:
        cfg = dataclasses.replace(cfg, attach_mode=AttachMode(args.attach_mode))
    if args.netns:
        cfg = dataclasses.replace(cfg, netns=args.netns)
    if args.pin_root:
        cfg = dataclasses.replace(cfg, pin_root=args.pin_root)
    res = node_apply.apply(cfg)
    modes = ", ".join(sorted({a.mode.value for a in res.attachments})) or "none"
    print(f"applied {cfg.source}: {res.endpoints} endpoint(s), {len(res.attachments)} attachment(s) "
          f"({modes}), pins under {cfg.pin_root}" + (" (reused)" if res.reused_pins else ""))
    for r in res.resized:
        print(f"resized {r.map}: {r.old_entries} -> {r.new_entries} entries, {r.copied} copied, "
              f"{r.dropped} dropped")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    path = args.config or agent.DEFAULT_CONFIG
    addr = agent.DEFAULT_PROM_ADDR if args.prometheus_serve_addr is None else args.prometheus_serve_addr
    http.parse_addr(addr)   # a bad address fails before anything changes

    def overrides(cfg: configmod.NodeConfig) -> configmod.NodeConfig:
        cfg = options.merge_flags(cfg, args)
        if args.pin_root:
                cfg = dataclasses.replace(cfg, pin_root=args.pin_root)
        return cfg

    return agent.run_agent(path, overrides, addr, node_exporter_compat=args.metrics_node_exporter_compat)


def parse_bool(text: str) -> bool:
    """An argparse type: true/false (also 1/0, yes/no)."""
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


def cmd_teardown(args: argparse.Namespace) -> int:
    removed = node_apply.teardown(pin_root_of(args), args.netns, keep_maps=args.keep_maps)
    print(f"detached {len(removed)} attachment(s)" + ("" if args.keep_maps else "; maps unpinned"))
    return 0
