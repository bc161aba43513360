"""Entering a named network namespace (/run/netns/NAME) for a block of code.

``with enter("tpl-demo-node"): ...`` moves the *calling thread* into the namespace
and moves it back afterwards, however the block ends. Only the network namespace
changes: the mount namespace (and so bpffs pins and /proc/sys paths that are not
per-netns) stays. Sockets opened inside the block (netlink included) stay bound to
the namespace after the block ends.

setns(2) works per thread, so the original namespace is saved from
``/proc/thread-self/ns/net`` and nesting works per thread. (pyroute2's
pushns()/popns() keep one process-wide stack and save ``/proc/self/ns/net``, the
main thread's namespace, so they are wrong outside the main thread; this module
uses pyroute2's setns() with file descriptors instead.)
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from pyroute2 import netns as _netns

from tuplet.core.errors import TupletError

NETNS_RUN_DIR = "/run/netns"
_THREAD_NETNS = "/proc/thread-self/ns/net"


class NetnsError(TupletError):
    """A network namespace that does not exist or cannot be entered.

    ``str(err)`` reads ``network namespace 'X' does not exist (ip netns list)``.
    """

    def __init__(self, name: str, problem: str = "does not exist (ip netns list)", err: int = 0) -> None:
        self.name = name
        super().__init__(f"network namespace '{name}' {problem}", err=err)


def path(name: str) -> str:
    """Where ``ip netns`` (and pyroute2) bind-mount the namespace called ``name``."""
    return os.path.join(NETNS_RUN_DIR, name)


def _valid_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name


def _is_netns(st: os.stat_result) -> bool:
    # Every namespace file lives on the single nsfs superblock: compare with our own.
    return st.st_dev == os.stat(_THREAD_NETNS).st_dev


def exists(name: str) -> bool:
    """True when /run/netns/NAME is a mounted network namespace.

    A leftover placeholder file (an interrupted ``ip netns add``) does not count.
    """
    if not _valid_name(name):
        return False
    try:
        return _is_netns(os.stat(path(name)))
    except OSError:
        return False


def _setns(fd: int) -> None:
    # Python 3.11 has no os.setns; flags=0: never create a namespace as a side effect.
    _netns.setns(fd, flags=0)


@contextlib.contextmanager
def enter(name: str) -> Iterator[None]:
    """Run the block in network namespace ``name``; the original is restored afterwards.

    Raises :class:`NetnsError` when the namespace does not exist or cannot be entered.
    """
    if not _valid_name(name):
        raise NetnsError(name, "is not a valid namespace name (a name in /run/netns, no '/')")
    with enter_file(path(name), name):
        yield


@contextlib.contextmanager
def enter_file(ns_file: str, name: str = "") -> Iterator[None]:
    """:func:`enter` the namespace of a namespace file (``/run/netns/NAME``, ``/proc/PID/ns/net``)."""
    name = name or ns_file
    try:
        target = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(name) from None
    except OSError as e:
        raise NetnsError(name, "cannot be opened", e.errno or 0) from None
    try:
        if not _is_netns(os.fstat(target)):
            raise NetnsError(name)
        saved = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        except OSError as e:
            os.close(saved)
            raise NetnsError(name, "cannot be entered", e.errno or 0) from None
    finally:
        os.close(target)
    try:
        yield
    finally:
        try:
            _setns(saved)
        finally:
            os.close(saved)


def all_namespaces() -> list[str]:
    """One file per network namespace a process is in or ``ip netns`` names (this one first):
    ``/proc/PID/ns/net`` or ``/run/netns/NAME``."""
    found: dict[tuple[int, int], str] = {}
    pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
    named = sorted(os.listdir(NETNS_RUN_DIR)) if os.path.isdir(NETNS_RUN_DIR) else []
    for f in ["/proc/self/ns/net", *(f"/proc/{p}/ns/net" for p in pids), *(path(n) for n in named)]:
        try:
            st = os.stat(f)
            found.setdefault((st.st_dev, st.st_ino), f)
        except OSError:
            continue   # gone, or a kernel thread's
    return list(found.values())


def sysctl(key: str, value: str | int) -> None:
    """Write /proc/sys/<key> in the current network namespace (dots or slashes).

    Interface names in ``net.ipv4.conf.<ifname>.*`` keys must not contain dots.
    """
    p = "/proc/sys/" + key.replace(".", "/")
    with open(p, "w", encoding="ascii") as f:
        f.write(str(value))


def read_sysctl(key: str) -> str:
    """Read /proc/sys/<key> in the current network namespace."""
    with open("/proc/sys/" + key.replace(".", "/"), encoding="ascii") as f:
        return f.read().strip()


@contextlib.contextmanager
def maybe_enter(name: str | None) -> Iterator[None]:
    """:func:`enter` the namespace ``name``; with None, stay where the thread is."""
    if name:
        with enter(name):
            yield
    else:
        yield
