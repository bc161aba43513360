"""Entering a named network namespace (/run/netns/NAME) for a block of code."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from pyroute2 import netns as _netns

from .errors import TupletError

NETNS_RUN_DIR = "/run/netns"


class NetnsError(TupletError):
    """A network namespace that does not exist or cannot be entered."""


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


@contextlib.contextmanager
def enter(name: str) -> Iterator[None]:
    """Run the block in network namespace ``name``; the original is restored afterwards.

    Only the network namespace changes: the mount namespace (and so bpffs pins) stays.
    """
    if not exists(name):
        raise NetnsError(f"network namespace '{name}'", "enter", detail="does not exist (ip netns list)")
    try:
        _netns.pushns(name)
    except OSError as e:
        raise NetnsError(f"network namespace '{name}'", "enter", e.errno or 0) from None
    try:
        yield
    finally:
        _netns.popns()


def sysctl(path: str, value: str) -> None:
    """Write /proc/sys/<path> in the current network namespace (dots or slashes)."""
    p = "/proc/sys/" + path.replace(".", "/")
    with open(p, "w", encoding="ascii") as f:
        f.write(value)
