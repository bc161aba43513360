"""The `tuplet` command line: the parser, and one exit for every error."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from tuplet.agent import log as logmod
from tuplet.bpf.bpffs import DEFAULT_PIN_ROOT
from tuplet.bpf.links import AttachMode
from tuplet.cli import apply, ct, ct_events, ct_query, ct_top, endpoint, ipcache, status, svc
from tuplet.core.errors import ConfigError, TupletError, VerifierError
from tuplet.node import options


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
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


def parser() -> argparse.ArgumentParser:
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
    a.set_defaults(func=apply.cmd_apply)

    ag = sub.add_parser("agent", help="run the node agent (systemd service): apply, GC, metrics, reload on SIGHUP")
    ag.add_argument("--prometheus-serve-addr", default=None,
                    help="address of the metrics endpoint (default :9962; empty disables)")
    ag.add_argument("--metrics-node-exporter-compat", type=apply.parse_bool, default=True, metavar="true|false",
                    help="also export node_exporter's node_nf_conntrack_* for the CT tables (default true)")
    options.add_flags(ag)
    ag.set_defaults(func=apply.cmd_agent)

    t = sub.add_parser("teardown", help="detach the datapath and remove its pins")
    t.add_argument("--keep-maps", action="store_true", help="keep the pinned maps (conntrack state)")
    t.add_argument("--netns", default=None, help="network namespace of the node's devices")
    t.set_defaults(func=apply.cmd_teardown)

    c = sub.add_parser("ct", help="conntrack tables")
    csub = c.add_subparsers(dest="ct_command", required=True)
    ct_query.add_parsers(csub)
    ct_events.add_parser(csub)
    ct_top.add_parser(csub)
    cg = csub.add_parser("gc", help="run one garbage-collection pass and print what it did")
    cg.add_argument("-o", "--output", choices=["text", "json"], default="text")
    cg.add_argument("--method", choices=["auto", "kernel", "batch"], default="auto",
                    help="kernel: a BPF program walks and deletes in place; batch: batch syscalls "
                         "from user space (auto: kernel when the kernel accepts it)")
    cg.add_argument("--follow", action="store_true",
                    help="keep running passes on the schedule, and early when the datapath reports "
                         "a failed insert, until interrupted")
    options.add_flags(cg, options.GC_FLAG_KEYS)
    cg.set_defaults(func=ct.cmd_ct_gc)
    cs = csub.add_parser("stats", help="per-CPU conntrack counters (conntrack -S)")
    cs.add_argument("-o", "--output", choices=["text", "json"], default="text")
    cs.set_defaults(func=ct.cmd_ct_stats)
    cf = csub.add_parser("flush", help="delete every conntrack entry")
    cf.set_defaults(func=ct.cmd_ct_flush)

    s = sub.add_parser("status", help="attachments and tables")
    s.add_argument("-o", "--output", choices=["text", "json"], default="text")
    s.add_argument("--verbose", "-v", dest="status_verbose", action="store_true",
                   help="also how each map size was derived, and the GC settings")
    s.set_defaults(func=status.cmd_status)

    svc.add_parser(sub)
    endpoint.add_parser(sub)
    ipcache.add_parser(sub)

    m = sub.add_parser("metrics", help="datapath verdicts and drop reasons")
    m.add_argument("-o", "--output", choices=["text", "json"], default="text")
    m.set_defaults(func=status.cmd_metrics)
    return p


if __name__ == "__main__":
    sys.exit(main())
