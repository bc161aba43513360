"""What every `tuplet` subcommand shares: which datapath it talks to."""
from __future__ import annotations

import argparse

from tuplet.bpf.bpffs import DEFAULT_PIN_ROOT
from tuplet.node import config as configmod


def pin_root_of(args: argparse.Namespace) -> str:
    """--pin-root, else node.pin_root of --config, else the default."""
    if args.pin_root:
        return str(args.pin_root)
    if args.config:
        return configmod.load(args.config).pin_root
    return DEFAULT_PIN_ROOT
