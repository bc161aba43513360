"""Command-line flags for the conntrack settings, with the reference's names and defaults.

Every flag sets one key of the configuration file's ``[conntrack]`` table and takes
precedence over it. Values are checked exactly as the file's are, and an invalid one
raises :class:`~tuplet.errors.ConfigError` naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from tuplet.core.errors import ConfigError
from tuplet.node.config import Conntrack, NodeConfig, conntrack_from, conntrack_value, conntrack_values


@dataclass(frozen=True)
class Flag:
    name: str        # without the leading dashes
    key: str         # [conntrack] key
    kind: str        # "duration", "entries" or "ratio"
    default: str     # as the reference documents it
    help: str


FLAGS: tuple[Flag, ...] = (
    Flag("bpf-ct-timeout-regular-tcp", "timeout_regular_tcp", "duration", "2h13m20s",
         "lifetime of established TCP entries"),
    Flag("bpf-ct-timeout-regular-tcp-syn", "timeout_regular_tcp_syn", "duration", "1m0s",
         "lifetime of TCP entries until the handshake completes"),
    Flag("bpf-ct-timeout-regular-tcp-fin", "timeout_regular_tcp_fin", "duration", "10s",
         "lifetime of TCP entries once both sides closed"),
    Flag("bpf-ct-timeout-regular-any", "timeout_regular_any", "duration", "1m0s",
         "lifetime of non-TCP entries"),
    Flag("bpf-ct-timeout-service-tcp", "timeout_service_tcp", "duration", "2h13m20s",
         "lifetime of established TCP service entries"),
    Flag("bpf-ct-timeout-service-tcp-grace", "timeout_service_tcp_grace", "duration", "1m0s",
         "how long a closed TCP service entry keeps its backend"),
    Flag("bpf-ct-timeout-service-any", "timeout_service_any", "duration", "1m0s",
         "lifetime of non-TCP service entries"),
    Flag("bpf-ct-global-tcp-max", "tcp_max", "entries", "dynamic (524288 static)",
         "TCP conntrack table size; setting it turns dynamic sizing off for this table"),
    Flag("bpf-ct-global-any-max", "any_max", "entries", "dynamic (262144 static)",
         "non-TCP conntrack table size; setting it turns dynamic sizing off for this table"),
    Flag("bpf-nat-global-max", "nat_max", "entries", "dynamic ((TCP + non-TCP) x 2/3 static)",
         "NAT table size; setting it turns dynamic sizing off for this table"),
    Flag("bpf-map-dynamic-size-ratio", "map_dynamic_size_ratio", "ratio", "0.0025",
         "share of node memory for the tables whose size is not set (0: static defaults)"),
    Flag("conntrack-gc-interval", "gc_interval", "duration", "0s",
         "fixed GC interval (0s: adaptive, from 5m)"),
    Flag("conntrack-gc-max-interval", "gc_max_interval", "duration", "0s",
         "cap on the GC interval (0s: none)"),
)


GC_FLAG_KEYS = frozenset({"gc_interval", "gc_max_interval"})


def add_flags(p: argparse.ArgumentParser, keys: frozenset[str] | None = None) -> None:
    """Register the conntrack flags (all, or those setting ``keys``) on ``p``.

    A flag that is not given leaves the file's value (or the default)."""
    g = p.add_argument_group("conntrack settings (override the file's [conntrack] table)")
    for f in FLAGS:
        if keys is not None and f.key not in keys:
            continue
        g.add_argument(f"--{f.name}", dest=_dest(f), default=None, metavar=f.kind.upper(),
                       help=f"{f.help} (default {f.default})")


def _dest(f: Flag) -> str:
    return "ct_" + f.key


def _raw(f: Flag, text: str) -> Any:
    label = f"--{f.name}"
    if f.kind == "entries":
        try:
            return int(text, 0)
        except ValueError:
            raise ConfigError(label, f"must be an integer number of entries, got {text!r}") from None
    if f.kind == "ratio":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(label, f"must be a number between 0 and 1, got {text!r}") from None
    return text


def merge_flags(cfg: NodeConfig, args: argparse.Namespace) -> NodeConfig:
    """``cfg`` with the flags given on the command line applied. Nothing is applied if
    any flag is invalid."""
    values = conntrack_values(cfg.conntrack)
    changed = False
    for f in FLAGS:
        text = getattr(args, _dest(f), None)
        if text is None:
            continue
        values[f.key] = conntrack_value(f.key, _raw(f, text), f"--{f.name}")
        changed = True
    if not changed:
        return cfg
    ct: Conntrack = conntrack_from(values)
    return dataclasses.replace(cfg, conntrack=ct)
